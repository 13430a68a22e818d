"""Pictures of what a model learned, under one name: training curves, image grids, a PCA scatter.

This module only gathers the public names of the modules that draw them, so callers need one
import:

- `pnpp_tf.training_curves`: loss, Recall@K and learning rates per epoch (`CURVES_SIZE`).
- `pnpp_tf.image_grids`: a query and its neighbours as a grid of thumbnails (`grid_size`).
- `pnpp_tf.embedding_scatter`: a 2-D PCA of embeddings, one colour per class (`SCATTER_SIZE`).
- `pnpp_tf.figures`: what they share. Every figure is drawn off pyplot on the Agg canvas, so
  nothing needs a display; every PNG has a fixed pixel size and is written whole or not at all.
"""

from pnpp_tf.embedding_scatter import SCATTER_SIZE, save_embedding_scatter
from pnpp_tf.figures import DPI
from pnpp_tf.image_grids import (CELL_HEIGHT, CELL_WIDTH, GRID_HEADER, NEUTRAL, OTHER_CLASS,
                                 QUERY, SAME_CLASS, Cell, grid_size, load_thumbnail,
                                 save_image_grid, save_retrieval_grid, save_search_grid)
from pnpp_tf.training_curves import CURVES_SIZE, read_tensorboard_history, save_training_curves

__all__ = [
    "CELL_HEIGHT", "CELL_WIDTH", "CURVES_SIZE", "DPI", "GRID_HEADER", "NEUTRAL", "OTHER_CLASS",
    "QUERY", "SAME_CLASS", "SCATTER_SIZE", "Cell", "grid_size", "load_thumbnail",
    "read_tensorboard_history", "save_embedding_scatter", "save_image_grid",
    "save_retrieval_grid", "save_search_grid", "save_training_curves",
]
