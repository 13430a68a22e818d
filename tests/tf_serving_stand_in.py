"""What the tests of exported SavedModels share: TF Serving's gRPC PredictionService stood in for
in process, and saved_model_cli."""

import concurrent.futures
import contextlib
import os
import sys

import pytest
import tensorflow as tf


def saved_model_cli():
    """The command that runs saved_model_cli: beside this Python if installed there, else its module."""
    beside = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    return [beside] if os.path.exists(beside) else [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli"]


@contextlib.contextmanager
def prediction_service(signatures):
    """A PredictionService stub talking over gRPC, on a free local port, to what TF Serving does with a
    PredictRequest: the signature of `signatures` (a loaded SavedModel's) by name, its inputs by key.

    Skips the test without the `serving` extra (tensorflow_serving.apis). Yields the stub; the server
    stops on leaving.
    """
    pytest.importorskip("tensorflow_serving.apis.predict_pb2")
    import grpc  # pylint: disable=import-outside-toplevel
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc  # pylint: disable=import-outside-toplevel

    class StandIn(prediction_service_pb2_grpc.PredictionServiceServicer):
        def Predict(self, request, context):  # pylint: disable=invalid-name
            inputs = {k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()}
            response = predict_pb2.PredictResponse()
            for name, value in signatures[request.model_spec.signature_name](**inputs).items():
                response.outputs[name].CopyFrom(tf.make_tensor_proto(value))
            return response

    server = grpc.server(concurrent.futures.ThreadPoolExecutor(1))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(StandIn(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    finally:
        server.stop(None)


def predict_request(model, signature, inputs):
    """A PredictRequest (the client's of docs/exporting.md) for `signature` of the served `model`, with
    `inputs` {key: value}, each value made a TensorProto as it is."""
    from tensorflow_serving.apis import predict_pb2  # pylint: disable=import-outside-toplevel

    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    for key, value in inputs.items():
        request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
    return request
