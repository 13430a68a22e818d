"""The typed configs of the catalogue programs: `pnpp_tf.index`, `pnpp_tf.search` and `pnpp_tf.serve`.

    from pnpp_tf.catalogue_config import IndexConfig
    from pnpp_tf.index import run
    run(IndexConfig(model="runs/demo", images="photos/", index="photos.index", backend="hnsw"))

As in `pnpp_tf.config`, a field's `option(...)` is the one place an option is described.
"""

import dataclasses
import typing

from pnpp_tf.config import Config, option
from pnpp_tf.data.image_header import DEFAULT_MAX_PIXELS
from pnpp_tf.retrieval import ann, neighbours
from pnpp_tf.retrieval.catalogue import SEARCH_BACKENDS
from pnpp_tf.retrieval.cataloguing import DEFAULT_SHARD_SIZE
from pnpp_tf.retrieval.shards import DTYPES

_ANN = ann.AnnParams()


@dataclasses.dataclass(frozen=True)
class IndexConfig(Config):
    """What `pnpp_tf.index` embeds, with which model, into which catalogue, searched how."""

    model: typing.Optional[str] = option(None, "A training run's model_dir, or an exported SavedModel "
                                         "(version directory or export base directory).")
    images: typing.Optional[str] = option(None, "Folder of images, searched recursively.")
    index: typing.Optional[str] = option(None, "The catalogue index directory to create or bring up to date "
                                         "(only new and changed files are embedded).")
    batch_size: int = option(64, "Images per inference batch.", lower=1)
    progress: bool = option(True, "Show a progress bar.")
    max_pixels: int = option(DEFAULT_MAX_PIXELS, "Largest width x height of an image to index; a larger one is "
                             "skipped and reported, its size read from the header, undecoded.", lower=1)
    index_dtype: str = option("auto", "How embeddings are stored: float32, float16 (half the disk) or int8 "
                              "(a quarter; each row scaled to +-127); auto: as the index already stores them, "
                              "float32 for a new one.", choices=("auto", *DTYPES))
    backend: str = option("auto", "exact: no approximate structure (searched exactly); hnsw: a graph per shard "
                          "(usearch); ivfpq: inverted lists of product-quantised codes per shard (faiss), for "
                          "collections larger than memory; auto: as the index was built, exact for a new one. "
                          "Approximate shortlists are re-scored exactly.",
                          choices=("auto", "exact", *ann.APPROXIMATE))
    shard_size: int = option(DEFAULT_SHARD_SIZE, "Images per shard: embedded, written and committed together, "
                             "so a killed run loses at most one shard's work.", lower=1)
    hnsw_connectivity: int = option(_ANN.connectivity, "HNSW: links per node (M).", lower=2)
    hnsw_expansion_add: int = option(_ANN.expansion_add, "HNSW: candidates kept while building (efConstruction).",
                                     lower=1)
    hnsw_expansion_search: int = option(_ANN.expansion_search, "HNSW: candidates kept while searching (efSearch); "
                                        "at least the shortlist re-scored.", lower=1)
    ivf_lists: int = option(_ANN.lists, "IVF-PQ: inverted lists per shard (0: from the shard's size).", lower=0)
    ivf_probes: int = option(_ANN.probes, "IVF-PQ: lists searched per query.", lower=1)
    pq_bytes: int = option(_ANN.pq_bytes, "IVF-PQ: bytes per product-quantised code (0: the dimension / 8); "
                           "must divide the dimension.", lower=0)
    runner: str = option("", "Embed with an Apache Beam pipeline on this runner (needs pnpp_tf[beam]) into "
                         "--beam_output, then ingest that into a new --index; empty: in process.",
                         choices=("", "DirectRunner", "DataflowRunner", "FlinkRunner", "SparkRunner"))
    beam_args: str = option("", "Beam's own pipeline options, one shell-quoted string, e.g. \"--project=p "
                            "--region=r --temp_location=gs://b/tmp\" (DirectRunner default: "
                            "--direct_num_workers=2 --direct_running_mode=multi_processing).")
    beam_output: typing.Optional[str] = option(None, "Where the Beam pipeline writes its embeddings (any "
                                               "filesystem Beam writes; default: <index>.beam); a rerun resumes.")

    def ann_params(self):
        """The approximate backend's parameters, as `pnpp_tf.retrieval.ann` takes them."""
        return ann.AnnParams(connectivity=self.hnsw_connectivity, expansion_add=self.hnsw_expansion_add,
                             expansion_search=self.hnsw_expansion_search, lists=self.ivf_lists,
                             probes=self.ivf_probes, pq_bytes=self.pq_bytes)


@dataclasses.dataclass(frozen=True)
class CatalogueSearchConfig(Config):
    """The catalogue searched, with which model and how: what `SearchConfig` and `ServeConfig` share."""

    index: typing.Optional[str] = option(None, "A catalogue index written by python -m pnpp_tf.index (or an "
                                         "older single-file .npz index).")
    model: typing.Optional[str] = option(None, "The model to embed query images with (default: the one the index "
                                         "was built with; it must be the same model).")
    backend: str = option("auto", "auto: the index's approximate structure if it has one, else exact; exact; "
                          "hnsw or ivfpq (as built); faiss (IndexFlatIP, exact; .npz indexes only).",
                          choices=lambda: _SEARCH_CHOICES)
    rescore: int = option(0, "Approximate backends: candidates per query, the best by the structure's own "
                          "score over all shards, re-scored exactly (0: HNSW max(100, 10 k), IVF-PQ max(300, 30 k)).",
                          lower=0)
    hnsw_expansion_search: int = option(0, "HNSW: candidates kept while searching (efSearch) for these "
                                        "searches; 0: as the index was built.", lower=0)
    ivf_probes: int = option(0, "IVF-PQ: lists searched per query for these searches; 0: as the index was "
                             "built.", lower=0)

    def search_settings(self):
        """The approximate search settings given, as `Catalogue.open` takes them."""
        return {"expansion_search": self.hnsw_expansion_search, "probes": self.ivf_probes}


@dataclasses.dataclass(frozen=True)
class SearchConfig(CatalogueSearchConfig):
    """What `pnpp_tf.search` looks for, and where."""

    query: typing.Optional[str] = option(None, "The query: an image; or a folder of images, or a text file "
                                         "listing one image path per line, answered as JSON lines.")
    k: int = option(10, "How many neighbours to list.", lower=1)
    grid: typing.Optional[str] = option(None, "Optional PNG: the query and its neighbours (one query only).")
    output: typing.Optional[str] = option(None, "Where the JSON lines of many queries go (default: stdout).")
    batch_size: int = option(64, "Query images embedded per batch.", lower=1)
    threshold: typing.Optional[float] = option(None, "Also decide: a neighbour is a match when its cosine similarity "
                                               "is at least this (distance at most 1 - threshold), e.g. a threshold "
                                               "pnpp_tf.evaluate --calibrate chose.", lower=-1.0, upper=1.0)


_SEARCH_CHOICES = tuple(dict.fromkeys((*SEARCH_BACKENDS, *neighbours.BACKENDS, *neighbours.ALIASES)))


@dataclasses.dataclass(frozen=True)
class ServeConfig(CatalogueSearchConfig):
    """What `pnpp_tf.serve` serves over HTTP, where, and its bounds (uploads are its query images)."""

    host: str = option("127.0.0.1", "The address to listen on: 127.0.0.1 (this machine only) unless you mean "
                       "to serve others.")
    port: int = option(8000, "The TCP port (0: any free one; the URL printed names it).", lower=0, upper=65535)
    max_k: int = option(100, "The most neighbours one search returns.", lower=1)
    max_upload_bytes: int = option(20 * 1024 * 1024, "The largest upload, in bytes (larger: 413).", lower=1)
    max_pixels: int = option(DEFAULT_MAX_PIXELS, "The largest width x height of an upload, read from its header "
                             "before decoding (larger: 413).", lower=1)
    max_failure_queries: int = option(5000, "Items searched against the rest for /api/failures (evenly spaced "
                                      "if the index holds more).", lower=1)
