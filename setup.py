"""Packaging for pnpp_tf: ProxyNCA++ deep metric learning in TensorFlow/Keras 3."""

import pathlib

from setuptools import find_packages, setup

HERE = pathlib.Path(__file__).parent

setup(
    name="pnpp_tf",
    version="0.1.0",
    description="ProxyNCA++ deep metric learning for zero-shot image retrieval, in TensorFlow/Keras 3",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["pnpp_tf", "pnpp_tf.*"]),
    package_data={"pnpp_tf.serving": ["page.html"]},  # the page pnpp_tf.serve serves at /
    install_requires=[
        # Keras 3 ships with TF >= 2.16; 2.20-2.21 is what this package is tested on.
        "tensorflow>=2.20,<2.22",
        # ProxyNCAModel overrides Keras' private Model._maybe_symbolic_build and TorchAdam uses
        # Optimizer._get_variable_index: bounded to the releases the tests were run on (3.12.0 and
        # 3.15.1; tests/test_model.py and test_optimizers.py fail naming the hook if one changes).
        "keras>=3.12,<3.16",
        "numpy>=1.26",
        "absl-py>=2.0",
        "tensorboard>=2.20",  # TensorFlow 2.21 no longer installs it; the training logs need it
        "scikit-learn>=1.3",
        "scipy>=1.10",  # reads Cars196's cars_annos.mat
        "matplotlib>=3.7",
        "Pillow>=10.0",
    ],
    extras_require={
        # The export tests run the TFLite variants and build TF Serving requests; the evaluation
        # tests check the faiss backend against the TensorFlow one; the TFDS reader tests prepare
        # tiny datasets with TFDS's own builders; the KerasHub tests build tiny presets offline.
        # tests/test_docs.py builds the documentation site with `mkdocs build --strict`.
        # tests/retrieval/test_ann.py builds, saves and memory-maps usearch HNSW graphs (and faiss IVF-PQ).
        # tests/test_export_onnx.py converts every backbone family to ONNX and runs it (the onnx extra's pins).
        "test": ["pytest>=8.2", "pytest-xdist>=3.5", "ai-edge-litert>=2.0,<3", "tensorflow-serving-api>=2.20,<2.22", "faiss-cpu>=1.11",
                 "usearch>=2.12,<3", "tensorflow-datasets>=4.9,<5", "keras-hub>=0.32,<0.33", "tensorflow-text>=2.20.1,<2.22",
                 "mkdocs>=1.6", "mkdocs-material>=9.5",
                 # tests/serving/test_service.py: the search service, and its page in Chromium (apt) via Playwright.
                 "fastapi>=0.165,<1", "uvicorn>=0.55,<1", "python-multipart>=0.0.34,<0.1", "httpx>=0.28,<1",
                 "playwright>=1.50,<2",
                 # tests/retrieval/test_beam.py runs the Beam pipeline on the DirectRunner (2 processes).
                 "apache-beam>=2.77,<3",
                 "tf2onnx>=1.17,<2", "onnx>=1.17", "onnxruntime>=1.20"],
        # The documentation site under docs/ (mkdocs.yml): `mkdocs serve`, `mkdocs build --strict`.
        "docs": ["mkdocs>=1.6", "mkdocs-material>=9.5"],
        # python -m pnpp_tf.serve: the HTTP search service (tested on fastapi 0.165 / starlette 1.10, uvicorn 0.55,
        # python-multipart 0.0.34, which FastAPI needs to read the multipart form).
        "serve": ["fastapi>=0.165,<1", "uvicorn>=0.55,<1", "python-multipart>=0.0.34,<0.1"],
        "tflite": ["ai-edge-litert>=2.0,<3"],
        # --format=onnx (pnpp_tf.serving.onnx_export). Tested on tf2onnx 1.17.0, onnx 1.23.2, onnxruntime 1.32.0
        # with protobuf 6.33.6 and numpy 2.4: `pip check` clean beside apache-beam 2.78 (protobuf<7) and
        # TensorFlow 2.21 (protobuf>=6.31.1), the window onnx 1.23 (>=6.31.1) also needs. tf2onnx before
        # 1.17 fails under numpy 2 (np.object, np.cast), hence the floor.
        "onnx": ["tf2onnx>=1.17,<2", "onnx>=1.17", "onnxruntime>=1.20"],
        "serving": ["tensorflow-serving-api>=2.20,<2.22"],
        "faiss": ["faiss-cpu>=1.8"],
        # The catalogue index's approximate shard structures (pnpp_tf.retrieval.ann): --backend=hnsw is
        # a usearch graph (2.12+: Index.restore(view=True) memory-maps it), ivfpq a faiss IndexIVFPQ.
        # faiss 1.11+ memory-maps an IVF-PQ file (IO_FLAG_MMAP_IFC); older ones read it into memory.
        "ann": ["usearch>=2.12,<3", "faiss-cpu>=1.11"],
        # python -m pnpp_tf.index --runner=... (pnpp_tf.retrieval.beam). apache-beam 2.77 pins protobuf<7,
        # pillow<13, pyarrow<26: installing it downgrades those (TensorFlow 2.21 accepts protobuf 6).
        "beam": ["apache-beam>=2.77,<3"],
        # --backbone=keras_hub. pnpp_tf.modeling.hub_backbones relies on where KerasHub's DINOv2/DINOv3/ViT put
        # their CLS and register tokens: bounded to 0.32, on which tests/test_keras_hub.py checks it.
        # keras-hub 0.32 needs tensorflow-text >= 2.20.1; its 2.20/2.21 wheels match TensorFlow's.
        "hub": ["keras-hub>=0.32,<0.33", "tensorflow-text>=2.20.1,<2.22"],
        # --dataset=tfds_*; `tfds build` itself needs importlib_resources on Python >= 3.9
        # (tensorflow/datasets#11212: 4.9.10 imports it without declaring it).
        "tfds": ["tensorflow-datasets>=4.9,<5", "importlib_resources"],
        # tools/convert_torchvision_resnet50.py: torch reads .pth files, safetensors .safetensors.
        "convert": ["torch", "safetensors"],
    },
)
