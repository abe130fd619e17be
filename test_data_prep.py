"""Tests of data_prep.py: rebuilding from raw dumps (expected files worked out by hand), downloading with
checksum verification (from a local file:// URL), and the statistics of the four published files."""
import gzip
import hashlib
import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import types

import pytest

import data_prep as D
from conftest import DATA_DIR, missing, needs


def write_amazon(path, records):
    with gzip.open(path, "wt") as f:
        for user, item, time in records:
            f.write(json.dumps({"reviewerID": user, "asin": item, "unixReviewTime": time, "overall": 5.0,
                                "reviewText": "fine"}) + "\n")


def write_yelp(path, records):
    with open(path, "w") as f:
        for user, business, date in records:
            f.write(json.dumps({"review_id": "r", "user_id": user, "business_id": business, "stars": 4.0,
                                "date": date}) + "\n")


# Amazon: in file order. Worked by hand:
#  * users by first appearance: u6 u3 u1 u2 u4 u5 u7 u8 u9
#  * k-core pass 1 drops item X (4 users); pass 2 drops u6..u9 (now 4 items each); pass 3 drops item Y (now only
#    u1) -- each only after the pass before it. Left: u3 u1 u2 u4 u5 -> user ids 1..5.
#  * stable sort by time: u1's B and A share time 50 and keep file order (B, A); so do its C, D at 60; u4's five
#    reviews share one time; u5 sorts to D(7) B(8) E(9) A(9) C(9); u2 is listed newest first.
#  * item ids by first encounter scanning u3 (A B C D E): A1 B2 C3 D4 E5.
AMAZON = [
    ("u6", "X", 100), ("u3", "C", 30), ("u3", "A", 10), ("u1", "B", 50), ("u1", "A", 50), ("u3", "B", 20),
    ("u3", "E", 50), ("u3", "D", 40), ("u2", "E", 5), ("u2", "D", 4), ("u2", "C", 3), ("u2", "B", 2), ("u2", "A", 1),
    ("u1", "Y", 10), ("u1", "C", 60), ("u1", "D", 60), ("u1", "E", 70),
    ("u4", "A", 1), ("u4", "B", 1), ("u4", "C", 1), ("u4", "D", 1), ("u4", "E", 1),
    ("u5", "E", 9), ("u5", "A", 9), ("u5", "B", 8), ("u5", "C", 9), ("u5", "D", 7),
    ("u6", "Y", 101), ("u6", "A", 102), ("u6", "B", 103), ("u6", "C", 104),
    *[(u, item, time) for u in ("u7", "u8", "u9") for time, item in enumerate("XYABC", start=1)],
]
ASIN = {"A": "B00M", "B": "B00K", "C": "B00Z", "D": "B00A", "E": "B00Q"}  # first seen in an order that is not sorted
AMAZON = [(user, ASIN.get(item, item), time) for user, item, time in AMAZON]
AMAZON_EXPECTED = "1 1 2 3 4 5\n2 2 1 3 4 5\n3 1 2 3 4 5\n4 1 2 3 4 5\n5 4 2 5 1 3\n"

# Yelp: in file order. Worked by hand:
#  * kept: '2019-01-01 00:00:00' <= date <= '2019-12-31 00:00:00' as strings, so 2018-12-31 23:59:59,
#    2019-12-31 00:00:01 and 2020 are out, 2019-01-01 00:00:00 is in.
#  * users by first in-window appearance: a b c d e f g; g keeps 3 reviews in the window -> dropped.
#  * repeats are kept and counted: a reviews P twice (6 reviews), f has only P and Q but 5 reviews -> kept.
#  * a's Q and R share a timestamp and keep file order.
#  * item ids by first encounter scanning a (P Q R P S T): P1 Q2 R3 S4 T5.
YELP = [
    ("g", "P", "2018-12-31 23:59:59"), ("a", "Q", "2019-03-01 10:00:00"), ("a", "P", "2019-02-01 10:00:00"),
    ("a", "P", "2019-05-01 10:00:00"), ("a", "R", "2019-03-01 10:00:00"), ("a", "S", "2019-06-01 00:00:00"),
    ("a", "T", "2019-12-31 00:00:01"), ("a", "T", "2019-07-01 00:00:00"),
    ("b", "T", "2019-01-01 00:00:00"), ("b", "S", "2019-01-02 00:00:00"), ("b", "R", "2019-01-03 00:00:00"),
    ("b", "Q", "2019-01-04 00:00:00"), ("b", "P", "2019-01-05 00:00:00"), ("b", "Z", "2020-01-01 00:00:00"),
    *[(u, item, f"2019-{month:02d}-0{day} 00:00:00") for u, month in (("c", 4), ("d", 8), ("e", 9))
      for day, item in enumerate("PQRST", start=1)],
    *[("f", item, f"2019-10-0{day} 00:00:00") for day, item in enumerate("PQPQP", start=1)],
    ("g", "Q", "2019-01-10 00:00:00"), ("g", "R", "2019-01-11 00:00:00"), ("g", "S", "2019-01-12 00:00:00"),
]
YELP_EXPECTED = "1 1 2 3 1 4 5\n2 5 4 3 2 1\n3 1 2 3 4 5\n4 1 2 3 4 5\n5 1 2 3 4 5\n6 1 2 1 2 1\n"


def test_amazon_rebuild_ties_sort_and_cascading_k_core(tmp_path, capsys):
    raw = tmp_path / "reviews_Beauty_5.json.gz"
    write_amazon(raw, AMAZON)
    matches = D.rebuild("beauty", str(raw), str(tmp_path / "data"))
    assert (tmp_path / "data" / "Beauty.rebuilt.txt").read_bytes() == AMAZON_EXPECTED.encode()
    assert matches is False and "DIFFERS from the published checksum" in capsys.readouterr().out


def test_yelp_rebuild_window_repeats_and_ties(tmp_path):
    raw = tmp_path / "yelp_academic_dataset_review.json"
    write_yelp(raw, YELP)
    D.rebuild("yelp", str(raw), str(tmp_path))
    assert (tmp_path / "Yelp.rebuilt.txt").read_bytes() == YELP_EXPECTED.encode()


def publish(monkeypatch, name, content):
    """Make `content` the published file of benchmark `name` (its checksum), as if it had been downloaded."""
    file_name, _, raw = D.BENCHMARKS[name]
    monkeypatch.setitem(D.BENCHMARKS, name, (file_name, hashlib.sha256(content.encode()).hexdigest(), raw))


VERIFIED = "1 1 2 3 4 5\n2 1 2 3 4 5\n"


@pytest.mark.parametrize("verified_present", [True, False])
def test_a_rebuild_that_differs_never_takes_the_benchmark_name(tmp_path, capsys, monkeypatch, verified_present):
    """It once replaced a verified Beauty.txt (Yelp.txt, which cannot be downloaded again, was lost so); with no file
    present it would pass for the published file with the trainer and with users."""
    publish(monkeypatch, "beauty", VERIFIED)
    data = tmp_path / "data"
    if verified_present:
        data.mkdir()
        (data / "Beauty.txt").write_text(VERIFIED)
    raw = tmp_path / "reviews_Beauty_5.json.gz"
    write_amazon(raw, AMAZON)
    assert D.main(["beauty", "--from-raw", str(raw), "--data-dir", str(data)]) == 1
    rebuilt = data / "Beauty.rebuilt.txt"
    assert rebuilt.read_bytes() == AMAZON_EXPECTED.encode()
    assert sorted(os.listdir(data)) == (["Beauty.rebuilt.txt", "Beauty.txt"] if verified_present else
                                        ["Beauty.rebuilt.txt"])
    if verified_present:
        assert (data / "Beauty.txt").read_text() == VERIFIED
    out = capsys.readouterr().out
    assert f"{rebuilt}: rebuilt, 5 users; DIFFERS from the published checksum, so it is not named Beauty.txt" in out
    assert f"train on it with --data {rebuilt}" in out


def test_a_rebuild_that_matches_lands_as_the_benchmark_file(tmp_path, capsys, monkeypatch):
    publish(monkeypatch, "beauty", AMAZON_EXPECTED)
    raw, data = tmp_path / "reviews_Beauty_5.json.gz", tmp_path / "data"
    write_amazon(raw, AMAZON)
    assert D.main(["beauty", "--from-raw", str(raw), "--data-dir", str(data)]) == 0
    assert os.listdir(data) == ["Beauty.txt"] and (data / "Beauty.txt").read_text() == AMAZON_EXPECTED
    assert f"{data / 'Beauty.txt'}: rebuilt, 5 users; matches the published checksum" in capsys.readouterr().out
    assert D.main(["beauty", "--from-raw", str(raw), "--data-dir", str(data)]) == 0  # again: nothing changes
    assert os.listdir(data) == ["Beauty.txt"] and "as does the file present" in capsys.readouterr().out


def test_a_file_present_that_is_not_the_published_one_is_never_replaced(tmp_path, capsys, monkeypatch):
    """Someone's own Beauty.txt (an older rebuild, an edit) is theirs: neither a matching rebuild nor a download
    replaces it silently; the line says what to do."""
    publish(monkeypatch, "beauty", AMAZON_EXPECTED)
    raw, data = tmp_path / "reviews_Beauty_5.json.gz", tmp_path / "data"
    write_amazon(raw, AMAZON)
    data.mkdir()
    (data / "Beauty.txt").write_text(VERIFIED)
    (tmp_path / "mirror").mkdir()
    (tmp_path / "mirror" / "Beauty.txt").write_text(AMAZON_EXPECTED)
    for command in (["--from-raw", str(raw)], ["--url", (tmp_path / "mirror").as_uri()]):
        assert D.main(["beauty", *command, "--data-dir", str(data)]) == 2
        err = capsys.readouterr().err
        assert err == (f"data_prep.py: error: {data / 'Beauty.txt'} is present but is not the published file "
                       f"(its SHA-256 differs); nothing was replaced: move it away (or train on it with --data "
                       f"{data / 'Beauty.txt'}) and run again\n")
        assert os.listdir(data) == ["Beauty.txt"] and (data / "Beauty.txt").read_text() == VERIFIED


def test_a_folder_where_the_rebuild_lands_is_one_line(tmp_path, capsys):
    raw, data = tmp_path / "reviews_Beauty_5.json.gz", tmp_path / "data"
    write_amazon(raw, AMAZON)
    (data / "Beauty.rebuilt.txt").mkdir(parents=True)
    assert D.main(["beauty", "--from-raw", str(raw), "--data-dir", str(data)]) == 2
    assert capsys.readouterr().err == (f"data_prep.py: error: cannot write {data / 'Beauty.rebuilt.txt'} (Is a "
                                       f"directory); nothing was written\n")
    assert os.listdir(data) == ["Beauty.rebuilt.txt"] and os.listdir(data / "Beauty.rebuilt.txt") == []


@pytest.mark.parametrize("records, problem", [
    ([], " holds no reviews; nothing was written"),
    ([("u1", "a", 1), ("u1", "b", 2)], ": no user is left after the 5-core (2 reviews); nothing was written"),
])
def test_a_dump_that_gives_no_users_writes_nothing(tmp_path, capsys, monkeypatch, records, problem):
    """An empty but valid dump once left a 0-byte Beauty.txt in place of the verified one."""
    publish(monkeypatch, "beauty", VERIFIED)
    raw, data = tmp_path / "reviews_Beauty_5.json.gz", tmp_path / "data"
    write_amazon(raw, records)
    data.mkdir()
    (data / "Beauty.txt").write_text(VERIFIED)
    assert D.main(["beauty", "--from-raw", str(raw), "--data-dir", str(data)]) == 2
    assert capsys.readouterr().err == f"data_prep.py: error: {raw}{problem}\n"
    assert os.listdir(data) == ["Beauty.txt"] and (data / "Beauty.txt").read_text() == VERIFIED


def test_k_core_matches_a_one_at_a_time_removal():
    """The simultaneous drop-and-repeat loop against removing one offending user or item at a time."""
    import random
    rng = random.Random(0)
    for _ in range(50):
        sequences = [[rng.randrange(12) for _ in range(rng.randrange(1, 9))] for _ in range(25)]
        reviews = [(f"u{u}", f"i{i}", t) for u, s in enumerate(sequences) for t, i in enumerate(s)]
        fast = D.build_sequences(reviews, k=3)
        slow = {u: list(s) for u, s in enumerate(sequences)}
        while True:
            counts = {}
            for s in slow.values():
                for i in s:
                    counts[i] = counts.get(i, 0) + 1
            short = next((u for u, s in slow.items() if len(s) < 3), None)
            rare = next((i for i, c in counts.items() if c < 3), None)
            if short is not None:
                del slow[short]
            elif rare is not None:
                slow = {u: [i for i in s if i != rare] for u, s in slow.items()}
            else:
                break
        assert len(fast) == len(slow) and [len(s) for s in fast] == [len(s) for s in slow.values()]


def test_rebuild_rejects_a_file_that_is_not_a_review_dump(tmp_path):
    raw = tmp_path / "reviews_Beauty_5.json.gz"
    raw.write_bytes(b"not gzip")
    with pytest.raises(D.DataError, match=r"_5.json.gz line 1: not JSON \(Expecting value at column 1\)$"):
        D.rebuild("beauty", str(raw), str(tmp_path))
    assert not (tmp_path / "Beauty.txt").exists()


AMAZON_OK = json.dumps({"reviewerID": "u1", "asin": "a1", "unixReviewTime": 1, "overall": 5.0})
YELP_OK = json.dumps({"user_id": "u1", "business_id": "b1", "stars": 4.0, "date": "2019-05-01 10:00:00"})


def amazon_line(**changes):
    """An Amazon record with fields changed (a value of ... removes the field)."""
    record = {"reviewerID": "u1", "asin": "a1", "unixReviewTime": 1, "overall": 5.0, **changes}
    return json.dumps({k: v for k, v in record.items() if v is not ...})


def yelp_line(**changes):
    record = {"user_id": "u1", "business_id": "b1", "stars": 4.0, "date": "2019-05-01 10:00:00", **changes}
    return json.dumps({k: v for k, v in record.items() if v is not ...})


@pytest.mark.parametrize("name, line, problem", [
    ("beauty", "[1, 2]", "[1, 2] is not a review record (a JSON object with reviewerID, asin, unixReviewTime)"),
    ("beauty", "3", "3 is not a review record"),
    ("beauty", "null", "null is not a review record"),
    ("beauty", '"text"', '"text" is not a review record'),
    ("beauty", "{bad", "not JSON"),
    ("beauty", AMAZON_OK + " x", "not JSON"),
    ("beauty", amazon_line(reviewerID=...), "the record has no reviewerID (a JSON object with reviewerID, asin"),
    ("beauty", amazon_line(asin=...), "the record has no asin"),
    ("beauty", amazon_line(unixReviewTime=...), "the record has no unixReviewTime"),
    ("beauty", amazon_line(reviewerID=None), "reviewerID is null, not a non-empty string"),
    ("beauty", amazon_line(reviewerID=7), "reviewerID is 7, not a non-empty string"),
    ("beauty", amazon_line(reviewerID=""), 'reviewerID is "", not a non-empty string'),
    ("beauty", amazon_line(asin=None), "asin is null, not a non-empty string"),
    ("beauty", amazon_line(asin={}), "asin is {}, not a non-empty string"),
    ("beauty", amazon_line(unixReviewTime=None), "unixReviewTime is null, not a whole number"),
    ("beauty", amazon_line(unixReviewTime="soon"), 'unixReviewTime is "soon", not a whole number'),
    ("beauty", amazon_line(unixReviewTime=1.5), "unixReviewTime is 1.5, not a whole number"),
    ("beauty", amazon_line(unixReviewTime=True), "unixReviewTime is true, not a whole number"),
    ("beauty", amazon_line(unixReviewTime=[1]), "unixReviewTime is [1], not a whole number"),
    ("beauty", amazon_line(overall=None), "overall is null, not a number"),
    ("beauty", amazon_line(overall="great"), 'overall is "great", not a number'),
    ("beauty", AMAZON_OK.replace("5.0", "NaN"), "overall is NaN, not a number"),
    ("yelp", "[1]", "[1] is not a review record (a JSON object with user_id, business_id, date, stars)"),
    ("yelp", "null", "null is not a review record"),
    ("yelp", "5", "5 is not a review record"),
    ("yelp", yelp_line(user_id=...), "the record has no user_id"),
    ("yelp", yelp_line(business_id=...), "the record has no business_id"),
    ("yelp", yelp_line(date=...), "the record has no date"),
    ("yelp", yelp_line(stars=...), "the record has no stars"),
    ("yelp", yelp_line(user_id=None), "user_id is null, not a non-empty string"),
    ("yelp", yelp_line(business_id=None), "business_id is null, not a non-empty string"),
    ("yelp", yelp_line(business_id=3), "business_id is 3, not a non-empty string"),
    ("yelp", yelp_line(date=None), "date is null, not a date and time YYYY-MM-DD hh:mm:ss"),
    ("yelp", yelp_line(date=20190501), "date is 20190501, not a date and time"),
    ("yelp", yelp_line(date="yesterday"), 'date is "yesterday", not a date and time'),
    ("yelp", yelp_line(date="2019-05-01"), 'date is "2019-05-01", not a date and time'),
    ("yelp", yelp_line(date="2019-13-01 00:00:00"), 'date is "2019-13-01 00:00:00", not a date and time'),
    ("yelp", yelp_line(date="2019-5-1 1:00:00"), 'date is "2019-5-1 1:00:00", not a date and time'),
    ("yelp", yelp_line(stars=None), "stars is null, not a number"),
    ("yelp", yelp_line(stars="4"), 'stars is "4", not a number'),
])
def test_a_bad_raw_record_is_one_line_naming_file_line_and_problem(tmp_path, capsys, name, line, problem):
    """Each once ended in a traceback or, worse, in a rebuilt file (null ids became a user "None")."""
    good = AMAZON_OK if name == "beauty" else YELP_OK
    raw = tmp_path / ("reviews_Beauty_5.json.gz" if name == "beauty" else "review.json")
    content = (good + "\n\n" + line + "\n" + good + "\n").encode()  # the bad record is line 3 (blank lines count)
    raw.write_bytes(gzip.compress(content) if name == "beauty" else content)
    code = D.main([name, "--from-raw", str(raw), "--data-dir", str(tmp_path / "data")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"data_prep.py: error: {raw} line 3: ") and err.count("\n") == 1
    assert problem in err
    assert not (tmp_path / "data").exists()


def test_a_raw_dump_that_is_not_utf8_or_ends_early_is_one_line(tmp_path, capsys):
    raw = tmp_path / "reviews_Beauty_5.json.gz"
    raw.write_bytes(gzip.compress((AMAZON_OK + "\n").encode() + b'{"reviewerID": "u\xff"}\n'))
    assert D.main(["beauty", "--from-raw", str(raw), "--data-dir", str(tmp_path)]) == 2
    assert f"{raw} line 2: byte 0xff at column 18 is not UTF-8 text" in capsys.readouterr().err
    raw.write_bytes(gzip.compress(((AMAZON_OK + "\n") * 50).encode())[:-30])
    assert D.main(["beauty", "--from-raw", str(raw), "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{raw}: the compressed data ends early" in err and "incomplete download" in err


def test_compression_is_told_by_the_content_not_the_name(tmp_path):
    """A plain reviews_*.json (the uncompressed form of the dump) and a gzipped Yelp file both read."""
    plain, packed = tmp_path / "reviews_Beauty_5.json", tmp_path / "review.json.gz"
    write_amazon(plain.with_suffix(".gz"), AMAZON)
    plain.write_bytes(gzip.decompress(plain.with_suffix(".gz").read_bytes()))
    write_yelp(tmp_path / "y.json", YELP)
    packed.write_bytes(gzip.compress((tmp_path / "y.json").read_bytes()))
    assert D.build_sequences(D.read_amazon_reviews(str(plain))) == [
        [int(i) for i in line.split()[1:]] for line in AMAZON_EXPECTED.splitlines()]
    assert D.build_sequences(D.read_yelp_reviews(str(packed))) == [
        [int(i) for i in line.split()[1:]] for line in YELP_EXPECTED.splitlines()]


@pytest.fixture
def sources(tmp_path, monkeypatch):
    """A mirror folder holding a 'published' Beauty.txt and a raw dump that rebuilds it; no real data needed."""
    publish(monkeypatch, "beauty", AMAZON_EXPECTED)
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "Beauty.txt").write_text(AMAZON_EXPECTED)
    write_amazon(tmp_path / "reviews_Beauty_5.json.gz", AMAZON)
    return {"--url": mirror.as_uri(), "--from-raw": str(tmp_path / "reviews_Beauty_5.json.gz")}


@pytest.mark.parametrize("flag", ["--url", "--from-raw"])
@pytest.mark.parametrize("case", ["a file", "under a file", "empty", "variable names a file", "read-only"])
def test_a_data_folder_that_cannot_be_used_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch, sources,
                                                                         flag, case):
    """Each ended in a traceback (FileExistsError, NotADirectoryError, FileNotFoundError: '', PermissionError)."""
    (tmp_path / "file").write_text("mine\n")
    folder = {"a file": tmp_path / "file", "under a file": tmp_path / "file" / "sub", "empty": "",
              "variable names a file": tmp_path / "file", "read-only": tmp_path / "read-only"}[case]
    expected = {"a file": f"the data folder {folder} is a file, not a folder",
                "under a file": f"cannot make the data folder {folder} (Not a directory)",
                "empty": "the data folder's name is empty (--data-dir '')",
                "variable names a file": f"the data folder {folder} is a file, not a folder",
                "read-only": f"cannot write into the data folder {folder} (Permission denied)"}[case]
    if case == "read-only":
        if os.geteuid() == 0:
            pytest.skip("root writes into a read-only folder")
        folder.mkdir()
        folder.chmod(0o555)
    if case == "variable names a file":
        monkeypatch.setenv(D.DATA_DIR_VARIABLE, str(folder))
        command = ["beauty", flag, sources[flag]]
    else:
        command = ["beauty", flag, sources[flag], "--data-dir", str(folder)]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    try:
        assert D.main(command) == 2
    finally:
        if case == "read-only":
            folder.chmod(0o755)
    assert capsys.readouterr().err == f"data_prep.py: error: {expected}\n"
    assert sorted(p.name for p in tmp_path.rglob("*")) == before and (tmp_path / "file").read_text() == "mine\n"


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
@pytest.mark.parametrize("flag", ["--url", "--from-raw"])
def test_written_files_get_the_permissions_the_umask_gives(tmp_path, sources, flag, umask, mode):
    """Downloads and rebuilds were 0600 whatever the umask (tempfile.mkstemp), unreadable to a group's trainer."""
    old = os.umask(umask)
    try:
        assert D.main(["beauty", flag, sources[flag], "--data-dir", str(tmp_path / "data")]) == 0
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "data" / "Beauty.txt").st_mode & 0o777 == mode


# ----------------------------------------------------------------------------------------------------------------
# Downloading, from a local folder (file:// URL or path) and from a local HTTP server
# ----------------------------------------------------------------------------------------------------------------

@pytest.fixture
def server(tmp_path):
    if missing("beauty"):
        pytest.skip(missing("beauty"))
    source = os.path.join(DATA_DIR, "Beauty.txt")
    folder = tmp_path / "server"
    folder.mkdir()
    shutil.copy(source, folder / "Beauty.txt")
    return folder


def test_download_verifies_and_lands_the_file(server, tmp_path):
    data_dir = tmp_path / "data"
    path = D.download("beauty", str(data_dir), server.as_uri(), log=lambda _: None)
    assert D.sha256_of(path) == D.BENCHMARKS["beauty"][1]
    assert os.listdir(data_dir) == ["Beauty.txt"]
    messages = []
    D.download("beauty", str(data_dir), (tmp_path / "nowhere").as_uri(), log=messages.append)  # no fetch needed
    assert messages == [f"{path}: present, checksum ok"]


def test_corrupt_download_is_rejected_and_leaves_nothing(server, tmp_path):
    content = (server / "Beauty.txt").read_bytes()
    (server / "Beauty.txt").write_bytes(content.replace(b"1 1 2", b"1 2 1", 1))
    data_dir = tmp_path / "data"
    with pytest.raises(D.DataError, match="checksum mismatch"):
        D.download("beauty", str(data_dir), server.as_uri())
    assert os.listdir(data_dir) == []


@pytest.fixture
def web():
    """A local HTTP server: `web.routes` maps a path to (status, headers, body) or to a function of the request
    handler, others get 404; `web.requests`
    lists the paths asked for, `web.url` is its base URL."""
    state = types.SimpleNamespace(routes={}, requests=[])

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            state.requests.append(self.path)
            if callable(state.routes.get(self.path)):
                return state.routes[self.path](self)
            status, headers, body = state.routes.get(self.path, (404, {}, b"not here"))
            self.send_response(status)
            for key, value in {"Content-Length": str(len(body)), **headers}.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/"
    yield state
    server.shutdown()
    server.server_close()


def test_failed_download_says_so_in_one_line_names_the_remedy_and_leaves_nothing(tmp_path, capsys, web):
    web.routes["/Toys_and_Games.txt"] = (503, {}, b"busy")
    data_dir = tmp_path / "data"
    code = D.main(["toys", "--data-dir", str(data_dir), "--url", web.url])
    err = capsys.readouterr().err
    assert code == 2 and err == (
        f"data_prep.py: error: download of {web.url}Toys_and_Games.txt failed (HTTP 503 Service Unavailable); "
        f"nothing was written; without network, copy Toys_and_Games.txt into {data_dir}, or run: python "
        f"data_prep.py toys --data-dir {data_dir} --url FOLDER (a local folder or mirror holding it)\n")
    assert os.listdir(data_dir) == []


def test_download_is_the_function_other_modules_call_for_a_missing_benchmark(tmp_path, sources, web, monkeypatch):
    """uniform_seqrec.py calls download() when --data names a benchmark that is not there: same checks, same
    one-line DataError, whose message (shown by the caller) names the remedy when there is no network."""
    data_dir = tmp_path / "data"
    with pytest.raises(D.DownloadFailed) as failure:
        D.download("beauty", str(data_dir), web.url, log=lambda _: None)
    assert isinstance(failure.value, D.DataError) and "\n" not in str(failure.value)
    assert str(failure.value).endswith(f"; without network, copy Beauty.txt into {data_dir}, or run: python "
                                       f"data_prep.py beauty --data-dir {data_dir} --url FOLDER (a local folder or "
                                       f"mirror holding it)")
    monkeypatch.chdir(tmp_path)
    messages = []
    assert D.download("beauty", "data", sources["--url"], log=messages.append) == os.path.join("data", "Beauty.txt")
    assert messages == [f"{os.path.join('data', 'Beauty.txt')}: downloaded, checksum ok"]
    with pytest.raises(D.DataError, match="^unknown benchmark 'Beauty': not one of beauty, toys, sports, yelp$"):
        D.download("Beauty", "data")


@pytest.mark.parametrize("present", [False, True])
@pytest.mark.parametrize("network", ["HTTP 503", "connection refused"])
def test_all_tries_every_file_then_names_the_remedy(tmp_path, capsys, monkeypatch, web, network, present):
    """It stopped at the first failure, naming only it."""
    for path in ("/Beauty.txt", "/Toys_and_Games.txt", "/Sports_and_Outdoors.txt", "/Yelp.txt"):
        web.routes[path] = (503, {}, b"busy")
    url = web.url if network == "HTTP 503" else "http://127.0.0.1:9/"              # the discard port: nobody there
    data_dir = tmp_path / "data"
    if present:
        publish(monkeypatch, "beauty", VERIFIED)
        data_dir.mkdir()
        (data_dir / "Beauty.txt").write_text(VERIFIED)
    assert D.main(["all", "--data-dir", str(data_dir), "--url", url]) == 2
    out, err = capsys.readouterr()
    files = ["Beauty.txt", "Toys_and_Games.txt", "Sports_and_Outdoors.txt", "Yelp.txt"][present:]
    assert [line.split(":")[0] for line in out.splitlines() if "not obtained" in line] == files
    if network == "HTTP 503":
        assert web.requests == ["/" + f for f in files]
    reason = "HTTP 503 Service Unavailable" if network == "HTTP 503" else "Connection refused"
    assert err == (f"data_prep.py: error: could not get {', '.join(files)} (the first: download of {url}{files[0]} "
                   f"failed ({reason}); nothing was written); without network, copy {', '.join(files)} into "
                   f"{data_dir}, or run: python data_prep.py all --data-dir {data_dir} --url FOLDER (a local folder or "
                   f"mirror holding them)\n")
    assert os.listdir(data_dir) == (["Beauty.txt"] if present else [])


@pytest.mark.parametrize("url, problem", [
    ("", "--url is empty; give an http(s):// URL, or a local folder holding the files"),
    ("   ", "--url is empty; give an http(s):// URL, or a local folder holding the files"),
    ("garbage", "--url garbage: no such folder (give an http(s):// URL, or a local folder holding the files)"),
    ("gopher://example.org/", "--url gopher://example.org/: unsupported scheme gopher:// (use http://, https://, "
                              "file:// or a folder)"),
    ("http://127.0.0.1:notaport/", "--url http://127.0.0.1:notaport/ is not a valid URL (Port could not be cast"),
    ("http://127.0.0.1:99999/", "--url http://127.0.0.1:99999/ is not a valid URL (Port out of range 0-65535)"),
    ("http://[::1/", "--url http://[::1/ is not a valid URL (Invalid IPv6 URL)"),
    ("http:///x/", "--url http:///x/ names no host"),
    ("http://127.0.0.1:9/\nx", "--url 'http://127.0.0.1:9/\\nx' contains a control character"),
    ("file://elsewhere/data", "--url file://elsewhere/data: a file:// URL names a folder on this machine "
                              "(file:///path/to/folder)"),
])
def test_a_malformed_url_is_one_line_and_leaves_nothing(tmp_path, capsys, url, problem):
    """Garbage, an empty URL, a bad port or IPv6 address once ended in a traceback (ValueError, InvalidURL)."""
    code = D.main(["beauty", "--data-dir", str(tmp_path / "data"), "--url", url])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"data_prep.py: error: {problem}") and err.count("\n") == 1
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("form", ["path", "relative path", "file:// URL"])
def test_a_local_folder_as_url_works_without_network(tmp_path, monkeypatch, sources, form):
    """The remedy for a machine without network: the files copied from elsewhere into any folder."""
    mirror = tmp_path / "mirror"
    monkeypatch.chdir(tmp_path)
    url = {"path": str(mirror), "relative path": "mirror", "file:// URL": mirror.as_uri()}[form]
    assert D.main(["beauty", "--data-dir", str(tmp_path / "data"), "--url", url]) == 0
    assert os.listdir(tmp_path / "data") == ["Beauty.txt"]
    assert (tmp_path / "data" / "Beauty.txt").read_text() == AMAZON_EXPECTED


def test_a_local_folder_without_the_file_is_one_line(tmp_path, capsys, sources):
    (tmp_path / "mirror" / "Beauty.txt").unlink()
    assert D.main(["beauty", "--data-dir", str(tmp_path / "data"), "--url", str(tmp_path / "mirror")]) == 2
    assert capsys.readouterr().err == (f"data_prep.py: error: cannot read {tmp_path / 'mirror' / 'Beauty.txt'} "
                                       f"(No such file or directory); nothing was written\n")
    assert os.listdir(tmp_path / "data") == []


@pytest.mark.parametrize("headers, body, outcome", [
    ({}, AMAZON_EXPECTED.encode(), 0),
    ({"Content-Length": "about a megabyte"}, AMAZON_EXPECTED.encode(), 0),        # garbage: read to the end
    ({"Content-Length": "1000"}, AMAZON_EXPECTED.encode()[:10], "(the connection closed after 10 of 1,000 bytes)"),
])
def test_an_http_server_that_misbehaves_is_one_line_or_works(tmp_path, capsys, sources, web, headers, body, outcome):
    """A garbage Content-Length ended in a ValueError traceback; a dropped connection was called a checksum mismatch.
    Progress is drawn on a terminal only: stderr stays empty here."""
    web.routes["/Beauty.txt"] = (200, headers, body)
    code = D.main(["beauty", "--data-dir", str(tmp_path / "data"), "--url", web.url])
    err = capsys.readouterr().err
    if outcome == 0:
        assert code == 0 and (tmp_path / "data" / "Beauty.txt").read_text() == AMAZON_EXPECTED and err == ""
    else:
        assert code == 2 and err.count("\n") == 1 and outcome in err and "nothing was written" in err
        assert os.listdir(tmp_path / "data") == []


def test_a_disk_that_fills_up_is_one_line_and_leaves_nothing(tmp_path, capsys, sources, monkeypatch):
    class Full:
        def write(self, block):
            raise OSError(28, "No space left on device")
    real_new_partial = D.new_partial

    def new_partial(data_dir, file_name):
        out, partial = real_new_partial(data_dir, file_name)
        out.write = Full().write
        return out, partial
    monkeypatch.setattr(D, "new_partial", new_partial)
    for flag in ("--url", "--from-raw"):
        assert D.main(["beauty", flag, sources[flag], "--data-dir", str(tmp_path / "data")]) == 2
        assert capsys.readouterr().err == (f"data_prep.py: error: cannot write into the data folder {tmp_path / 'data'}"
                                           f" (No space left on device); nothing was written\n")
        assert os.listdir(tmp_path / "data") == []


def test_missing_benchmark_names_the_command_that_gets_it(tmp_path, capsys, monkeypatch):
    """The trainer fetches a missing benchmark (runs.py); without network it names the command that gets it."""
    import runs
    monkeypatch.setattr(runs, "download", lambda name, data_dir, log: D.download(name, data_dir, "http://127.0.0.1:9/",
                                                                               log))
    code = runs.main(["--data", "sports", "--data-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert f"python data_prep.py sports --data-dir {tmp_path}" in err


@pytest.mark.parametrize("flag", ["--url", "--from-raw"])
def test_an_interruption_leaves_nothing_half_written_and_no_traceback(tmp_path, capsys, sources, monkeypatch, flag):
    """Ctrl-C between writing and renaming: the partial file goes, the line says so (a traceback before)."""
    def interrupted(path):
        raise KeyboardInterrupt
    monkeypatch.setattr(D, "sha256_of", interrupted)
    assert D.main(["beauty", flag, sources[flag], "--data-dir", str(tmp_path / "data")]) == 130
    assert capsys.readouterr().err == "data_prep.py: interrupted; no file was left half-written\n"
    assert os.listdir(tmp_path / "data") == []


@pytest.mark.parametrize("flag", ["--url", "--from-raw"])
def test_a_killed_writers_partial_file_is_removed_by_the_next_write(tmp_path, monkeypatch, sources, flag):
    """Issue 33, item 13: SIGKILL mid-write leaves a hidden .part file that no handler could remove; the next write
    of that file removes such leftovers. One touched recently may be another process's, writing now: it stays."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    killed, writing = data_dir / ".Beauty.txt.0123456789abcdef.part", data_dir / ".Beauty.txt.fedcba9876543210.part"
    other = data_dir / ".Toys_and_Games.txt.0123456789abcdef.part"              # another file's: not this write's
    for path in (killed, writing, other):
        path.write_text("1 1 2")
    long_ago = time.time() - 2 * D.STALE_PARTIAL_SECONDS
    os.utime(killed, (long_ago, long_ago))
    os.utime(other, (long_ago, long_ago))
    assert D.main(["beauty", flag, sources[flag], "--data-dir", str(data_dir)]) == 0
    assert sorted(os.listdir(data_dir)) == sorted(["Beauty.txt", writing.name, other.name])


def test_a_terminated_download_leaves_nothing_half_written(tmp_path, web):
    """SIGTERM (a job scheduler, `kill`) mid-download: it once killed the process and left the .part file behind."""
    def stall(handler):
        handler.send_response(200)
        handler.send_header("Content-Length", "1000000")
        handler.end_headers()
        handler.wfile.write(b"1 1 2 3\n" * 1000)
        handler.wfile.flush()
        time.sleep(5)
    web.routes["/Beauty.txt"] = stall
    data_dir = tmp_path / "data"
    process = subprocess.Popen([sys.executable, D.__file__, "beauty", "--data-dir", str(data_dir), "--url", web.url],
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 10
    while not (data_dir.is_dir() and os.listdir(data_dir)) and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)                                                     # into the stalled read
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=10)
    assert process.returncode == 130 and err == "data_prep.py: interrupted; no file was left half-written\n"
    assert os.listdir(data_dir) == []


def test_output_into_a_closed_pipe_is_no_traceback(tmp_path):
    """`python data_prep.py --stats FILE | head -3`: a BrokenPipeError traceback once followed the three lines."""
    (tmp_path / "small.txt").write_text("1 1 2 3\n")
    reader, writer = os.pipe()
    os.close(reader)                                                    # nobody reads: every write is EPIPE
    try:
        done = subprocess.run([sys.executable, D.__file__, "--stats", str(tmp_path / "small.txt")], stdout=writer,
                              stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(writer)
    assert done.returncode == 1 and done.stderr == ""


STATS_ALONE = "--stats FILE inspects a file; give it without a dataset, --from-raw or --url (see --help)"


@pytest.mark.parametrize("command, problem", [
    (["beauty", "--from-raw", ""], "--from-raw needs a file name (see --help)"),
    (["beauty", "--from-raw", "<folder>"], "<folder> is a folder, not a raw review dump"),
    (["--stats", ""], "--stats needs a file name (see --help)"),
    (["beauty", "--stats", "<file>"], STATS_ALONE),
    (["--stats", "<file>", "--from-raw", "<file>"], STATS_ALONE),
    (["--stats", "<file>", "--url", "<folder>"], STATS_ALONE),
    (["beauty", "--from-raw", "<file>", "--url", "<folder>"],
     "--url is where downloads come from, --from-raw rebuilds from a dump: give one of them (see --help)"),
])
def test_contradictory_or_empty_options_are_one_line(tmp_path, capsys, command, problem):
    """--from-raw '' downloaded instead, a dataset or --from-raw beside --stats was ignored, --url beside --from-raw
    too, and a folder as the dump was 'no such raw file'."""
    (tmp_path / "small.txt").write_text("1 1 2 3\n")
    names = {"<folder>": str(tmp_path), "<file>": str(tmp_path / "small.txt")}
    try:
        code = D.main([names.get(word, word) for word in command] + ["--data-dir", str(tmp_path / "data")])
    except SystemExit as exit:                                              # argparse's error() exits
        code = exit.code
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err == f"data_prep.py: error: {problem.replace('<folder>', str(tmp_path))}\n"
    assert not (tmp_path / "data").exists()


# ----------------------------------------------------------------------------------------------------------------
# The four published files against docs/datasets.md section 6
# ----------------------------------------------------------------------------------------------------------------

PUBLISHED = {  # users, items, interactions, avg len, min, median, max, min freq, max freq, density %
    "beauty": (22_363, 12_101, 198_502, 8.876, 5, 6, 204, 5, 431, 0.0734),
    "sports": (35_598, 18_357, 296_337, 8.325, 5, 6, 296, 5, 1_042, 0.0453),
    "toys": (19_412, 11_924, 167_597, 8.634, 5, 6, 550, 5, 309, 0.0724),
    "yelp": (30_431, 20_033, 316_354, 10.396, 5, 7, 350, 5, 500, 0.0519),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_files_have_the_documented_statistics_and_checksums(name):
    if missing(name):
        pytest.skip(missing(name))
    path = D.benchmark_path(name, DATA_DIR)
    assert D.sha256_of(path) == D.BENCHMARKS[name][1]
    s = D.statistics_of(D.read_sequences(path))
    keys = ("users", "items", "interactions", "average length", "min length", "median length", "max length",
            "min item frequency", "max item frequency")
    assert tuple(s[k] for k in keys) == PUBLISHED[name][:9]
    assert round(s["density %"], 4) == PUBLISHED[name][9]
    assert s["largest item id"] == s["items"] and D.format_warnings(D.read_sequences(path)) == []


@needs("toys")
def test_stats_command_prints_the_table(capsys):
    path = D.benchmark_path("toys", DATA_DIR)
    assert D.main(["--stats", path]) == 0
    out = capsys.readouterr().out
    assert "users                        19,412" in out and "density %" in out and "warning" not in out


def test_stats_flags_a_file_that_is_not_a_5_core(tmp_path, capsys):
    path = tmp_path / "small.txt"
    path.write_text("1 1 2 3\n2 2 3 5\n")
    assert D.main(["--stats", str(path)]) == 0
    out = capsys.readouterr().out
    assert "not contiguous" in out and "2 users have fewer than 5 items" in out
