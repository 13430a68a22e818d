"""pnpp_tf.serve and pnpp_tf.serving.service: the HTTP search service, run for real (uvicorn in a
subprocess on a free local port), its API, its bounds, the files it will and will not serve, the
failures view against a naive loop, and the page in a headless Chromium."""

import os
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from cli_helpers import REPO
from conftest import make_folder_dataset, write_image
from pixel_bombs import write_png
from pnpp_tf.retrieval.catalogue import Catalogue
from pnpp_tf.retrieval.cataloguing import update_catalogue

MAX_UPLOAD = 200_000
MAX_K = 6


@pytest.fixture(scope="module")
def built(tiny_model, tmp_path_factory):
    """A catalogue, by conftest's tiny model, of a labelled split (2 classes x 3 images) plus one file
    that is a symbolic link to an image outside the indexed folder."""
    root = tmp_path_factory.mktemp("serve")
    photos = make_folder_dataset(root / "photos", train_classes=2, test_classes=2, images_per_class=3)
    split = os.path.join(photos, "test")
    secret = write_image(str(root / "outside" / "secret.png"), np.random.default_rng(1))
    os.symlink(secret, os.path.join(split, "test_class_01", "link.png"))
    index = str(root / "photos.index")
    update_catalogue(tiny_model["embedder"], split, index, verbose=0)
    catalogue = Catalogue.open(index)
    return {"root": root, "split": split, "index": index, "catalogue": catalogue,
            "paths": catalogue.relative_paths()}


@pytest.fixture(scope="module")
def server(built):
    """The service, `python -m pnpp_tf.serve --port=0`; stopped with SIGTERM, which must exit 0."""
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2")
    process = subprocess.Popen([sys.executable, "-m", "pnpp_tf.serve", f"--index={built['index']}", "--port=0",
                                f"--max_upload_bytes={MAX_UPLOAD}", f"--max_k={MAX_K}"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    line, deadline = "", time.monotonic() + 120
    while "Serving" not in line and time.monotonic() < deadline and process.poll() is None:
        if selector.select(timeout=1):
            line = process.stdout.readline()
    found = re.search(r"at (http://127\.0\.0\.1:\d+/)", line)
    if not found:
        process.kill()
        pytest.fail(f"the service did not start: {line!r} {process.stderr.read()[-3000:]}")
    yield found.group(1)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err[-3000:]
    assert "Stopped by SIGTERM." in out


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server, timeout=60) as http:
        yield http


def image_bytes(built, item):
    with open(os.path.join(built["split"], built["paths"][item]), "rb") as file:
        return file.read()


def test_search_finds_the_uploaded_image_first_multipart_and_raw_agree(built, client):
    data = image_bytes(built, 2)
    by_form = client.post("/search", files={"image": ("query.png", data)}, data={"k": "4"})
    assert by_form.status_code == 200, by_form.text
    answer = by_form.json()
    assert answer["k"] == 4 and answer["backend"] == "exact" and answer["seconds"] > 0
    first = answer["neighbours"][0]
    assert (first["rank"], first["item"], first["path"], first["url"]) == (1, 2, built["paths"][2], "/image/2")
    assert first["distance"] < 1e-4
    distances = [n["distance"] for n in answer["neighbours"]]
    assert distances == sorted(distances) and len(distances) == 4
    raw = client.post("/search?k=4", content=data, headers={"content-type": "application/octet-stream"})
    assert raw.status_code == 200, raw.text
    assert [(n["item"], n["path"]) for n in raw.json()["neighbours"]] == \
        [(n["item"], n["path"]) for n in answer["neighbours"]]
    np.testing.assert_allclose([n["distance"] for n in raw.json()["neighbours"]], distances, atol=1e-5)


def test_every_indexed_image_finds_itself_decoded_in_memory_as_when_indexed(built, client):
    for item in range(len(built["paths"])):
        first = client.post("/search?k=1", content=image_bytes(built, item)).json()["neighbours"][0]
        assert (first["item"], first["path"]) == (item, built["paths"][item]) and first["distance"] < 1e-4


def test_the_app_in_process(built):
    from starlette.testclient import TestClient  # pylint: disable=import-outside-toplevel
    from pnpp_tf.search import Searcher  # pylint: disable=import-outside-toplevel
    from pnpp_tf.serving.service import make_app  # pylint: disable=import-outside-toplevel
    with TestClient(make_app(Searcher(built["index"]), max_k=3)) as http:
        page = http.get("/")
        assert page.status_code == 200 and 'id="file"' in page.text and "http" not in page.text.split("<script>")[0]
        assert http.get("/api/info").json()["max_k"] == 3
        answer = http.post("/search", files={"image": ("q.png", image_bytes(built, 5))}).json()
        assert answer["k"] == 3 and answer["neighbours"][0]["item"] == 5


def test_bad_uploads_are_refused_with_their_reason(client, tmp_path):
    not_image = client.post("/search", files={"image": ("a.png", b"this is not an image")})
    assert not_image.status_code == 422 and "upload" in not_image.json()["detail"]
    too_long = b"\x89PNG" + b"\0" * MAX_UPLOAD
    for response in (client.post("/search", content=too_long),
                     client.post("/search", files={"image": ("big.png", too_long)}),
                     client.post("/search", content=iter([too_long[:100_000], too_long[100_000:]]))):  # chunked
        assert response.status_code == 413, response.text
        assert f"max_upload_bytes={MAX_UPLOAD}" in response.json()["detail"]
    bomb = open(write_png(tmp_path / "bomb.png", 20000, 20000), "rb").read()  # 76 KB, 400 megapixels
    assert len(bomb) < MAX_UPLOAD
    response = client.post("/search", files={"image": ("bomb.png", bomb)})
    assert response.status_code == 413 and "20000x20000" in response.json()["detail"]
    assert "max_pixels" in response.json()["detail"]
    assert client.post("/search", content=b"").status_code == 422
    assert client.post("/search", files={"other": ("a.png", b"x")}).status_code == 422


def test_k_out_of_range_names_the_bound(built, client):
    data = image_bytes(built, 0)
    assert len(built["paths"]) == 7 > MAX_K
    for k in ("0", str(MAX_K + 1), "-3"):
        response = client.post(f"/search?k={k}", content=data)
        assert response.status_code == 422 and f"between 1 and {MAX_K} (max_k={MAX_K})" in response.json()["detail"]
    assert client.post("/search?k=two", content=data).status_code == 422
    assert client.post(f"/search?k={MAX_K}", content=data).status_code == 200


def test_images_are_only_the_collections(built, client, server):
    assert client.get("/image/0").content == image_bytes(built, 0)
    thumbnail = client.get("/image/1?size=16")
    assert thumbnail.status_code == 200 and thumbnail.headers["content-type"] == "image/jpeg"
    with Image.open(__import__("io").BytesIO(thumbnail.content)) as picture:
        assert max(picture.size) == 16
    assert client.get("/image/1?size=100000").status_code == 422
    for item in ("7", "999", "-1", "abc", "0x1", "%C2%B2", "1.0"):
        assert client.get(f"/image/{item}").status_code == 404
    link = built["paths"].index(os.path.join("test_class_01", "link.png"))
    assert client.get(f"/image/{link}").status_code == 403  # a link out of the indexed folder
    assert client.get(f"/image/{link}?size=32").status_code == 403
    host, port = re.match(r"http://([\d.]+):(\d+)/", server).groups()
    for target in ("/image/../../etc/passwd", "/image/%2e%2e%2f%2e%2e%2fetc%2fpasswd", "/image/..%2f..%2fetc%2fpasswd",
                   "/../../etc/passwd", "/image/0/../../../../etc/passwd"):
        with socket.create_connection((host, int(port)), timeout=10) as conn:  # unnormalised, as sent
            conn.sendall(f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            reply = b""
            while chunk := conn.recv(65536):
                reply += chunk
        status = int(reply.split(b" ", 2)[1])
        assert status in (400, 404), (target, reply[:300])
        assert b"root:" not in reply


def test_info(built, client):
    info = client.get("/api/info").json()
    assert info["images"] == 7 and info["dtype"] == "float32" and info["backend"] == "exact"
    assert info["labelled"] is True and info["classes"] == 2 and info["max_k"] == MAX_K
    assert info["model"] == built["catalogue"].manifest["model"]


def naive_failures(catalogue):
    """(item, first positive rank) of every item with a positive, worst first: one query at a time."""
    rows = catalogue.unit_rows()
    labels = [os.path.basename(os.path.dirname(path)) for path in catalogue.relative_paths()]
    found = []
    for query in range(len(rows)):
        others = sorted((j for j in range(len(rows)) if j != query), key=lambda j: (-float(rows[query] @ rows[j]), j))
        same = [position for position, j in enumerate(others) if labels[j] == labels[query]]
        if same:
            found.append((query, same[0]))
    return sorted(found, key=lambda pair: (-pair[1], pair[0])), labels


def test_failures_match_a_naive_loop(built, client):
    expected, labels = naive_failures(built["catalogue"])
    answer = client.get("/api/failures?limit=100&neighbours=3").json()
    assert [(f["item"], f["first_positive_rank"]) for f in answer["failures"]] == expected
    assert answer["queries"] == 7 and answer["of"] == 7 and answer["without_positive"] == 0
    assert answer["recall_at_1"] == pytest.approx(np.mean([rank == 0 for _, rank in expected]), abs=1e-6)
    for failure in answer["failures"]:
        assert failure["class"] == labels[failure["item"]] and len(failure["neighbours"]) == 3
        assert all(n["hit"] == (labels[n["item"]] == failure["class"]) for n in failure["neighbours"])
        assert failure["item"] not in [n["item"] for n in failure["neighbours"]]
        first_hit = next((n["rank"] - 1 for n in failure["neighbours"] if n["hit"]), None)
        assert first_hit in (failure["first_positive_rank"], None)
    per_class = {c["class"]: c["recall_at_1"] for c in answer["classes"]}
    for name in set(labels):
        ranks = [rank for item, rank in expected if labels[item] == name]
        assert per_class[name] == pytest.approx(np.mean([rank == 0 for rank in ranks]), abs=1e-6)
    assert len(client.get("/api/failures?limit=2").json()["failures"]) == 2
    assert client.get("/api/failures?limit=0").status_code == 422


def test_page_in_headless_chromium(built, server, tmp_path):
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if not executable:
        pytest.skip("no chromium executable (CI installs it: apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra")
    query = tmp_path / "query.png"
    query.write_bytes(image_bytes(built, 4))
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 700})
            page.goto(server)
            page.wait_for_selector("#info:not(:empty)")
            page.set_input_files("#file", str(query))
            page.wait_for_selector(".neighbour[data-path]", timeout=30_000)
            first = page.locator("#results .neighbour").first
            assert first.get_attribute("data-path") == built["paths"][4]
            assert first.get_attribute("data-rank") == "1"
            assert built["paths"][4] in page.inner_text("#results")
            assert page.locator("#results .neighbour").count() == 6  # k = 10, bounded by max_k
            page.click("#tab-failures")
            page.wait_for_selector(".failure[data-path]", timeout=30_000)
            assert page.is_visible("#failures-view") and not page.is_visible("#search-view")
            assert page.locator(".failure").count() == 7
            assert page.locator(".failure .neighbour.hit, .failure .neighbour.miss").count() == 7 * 5
        finally:
            browser.close()


def test_serve_config_bounds_and_flags():
    from pnpp_tf import flags as pnpp_flags  # pylint: disable=import-outside-toplevel
    from pnpp_tf.catalogue_config import ServeConfig  # pylint: disable=import-outside-toplevel
    from pnpp_tf.errors import UserError  # pylint: disable=import-outside-toplevel
    assert ServeConfig().host == "127.0.0.1"  # localhost unless asked
    assert pnpp_flags.parse(ServeConfig, ["program"]) == ServeConfig()
    for name, value in (("port", 65536), ("port", -1), ("max_k", 0), ("max_upload_bytes", 0), ("max_pixels", 0)):
        with pytest.raises(UserError, match=f"^--{name}="):
            ServeConfig(**{name: value})


def test_failures_are_bounded_to_evenly_spaced_queries(built):
    from pnpp_tf.serving.failures import Failures  # pylint: disable=import-outside-toplevel
    expected = dict(naive_failures(built["catalogue"])[0])
    failures = Failures(built["catalogue"], max_queries=3)
    queries, ranks = failures.ranks()
    assert queries.tolist() == [0, 3, 6]
    assert ranks.tolist() == [expected[item] for item in queries.tolist()]
    report = failures.report(10, 2, lambda item: built["paths"][item])
    assert report["sampled"] and report["queries"] == 3 and report["of"] == 7
