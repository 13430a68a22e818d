"""Pictures of what a model learned: training curves, image grids, a PCA scatter.

The package's public names are gathered here, so callers need one import
(`from pnpp_tf import plots; plots.save_training_curves(...)`):

- `pnpp_tf.plots.curves`: loss, Recall@K and learning rates per epoch (`CURVES_SIZE`), drawn as a
  run's flags say by `save_run_curves`.
- `pnpp_tf.plots.grids`: a query and its neighbours as a grid of thumbnails (`grid_size`).
- `pnpp_tf.plots.scatter`: a 2-D PCA of embeddings, one colour per class (`SCATTER_SIZE`).
- `pnpp_tf.plots.roc`: the ROC of match decisions and the rates by threshold (`ROC_SIZE`).
- `pnpp_tf.plots.figures`: what they share. Every figure is drawn off pyplot on the Agg canvas,
  so nothing needs a display; every PNG has a fixed pixel size and is written whole or not at all.
"""

from pnpp_tf.plots.curves import (CURVES_SIZE, read_tensorboard_history, save_run_curves,
                                  save_training_curves)
from pnpp_tf.plots.figures import DPI
from pnpp_tf.plots.grids import (CELL_HEIGHT, CELL_WIDTH, GRID_HEADER, NEUTRAL, OTHER_CLASS,
                                 QUERY, SAME_CLASS, Cell, grid_size, load_thumbnail,
                                 save_image_grid, save_retrieval_grid, save_search_grid)
from pnpp_tf.plots.roc import ROC_SIZE, save_roc
from pnpp_tf.plots.scatter import SCATTER_SIZE, save_embedding_scatter

__all__ = [
    "CELL_HEIGHT", "CELL_WIDTH", "CURVES_SIZE", "DPI", "GRID_HEADER", "NEUTRAL", "OTHER_CLASS",
    "QUERY", "ROC_SIZE", "SAME_CLASS", "SCATTER_SIZE", "Cell", "grid_size", "load_thumbnail",
    "read_tensorboard_history", "save_embedding_scatter", "save_image_grid",
    "save_retrieval_grid", "save_roc", "save_run_curves", "save_search_grid", "save_training_curves",
]
