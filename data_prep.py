"""Get, verify and rebuild the paper's four benchmark files (one line per user: `user item item ...`).

    python data_prep.py beauty                 download Beauty.txt into the data folder, SHA-256 checked
    python data_prep.py all                    the four of them (each tried; then what failed, and the remedy)
    python data_prep.py all --url /mnt/copy    without network: from a local folder holding them (or file:// URL)
    python data_prep.py beauty --from-raw reviews_Beauty_5.json.gz
    python data_prep.py yelp --from-raw yelp_academic_dataset_review.json
                                               a rebuild is named Beauty.txt etc. only when it matches the
                                               published checksum, else Beauty.rebuilt.txt (--data PATH trains on it)
    python data_prep.py --stats data/Beauty.txt

The files are the S3-Rec ones (docs/datasets.md): 5-core, chronological, ids from 1 (0 is padding).
`read_sequences` below is the one reader of such files; runs.py (the command line of uniform_seqrec.py) imports it,
so both programs accept and reject exactly the same files (uniform_seqrec.py imports only DataError). Standard
library only (numpy is not even needed).
"""
import argparse
import codecs
import datetime
import gzip
import hashlib
import http.client
import json
import math
import os
import re
import secrets
import signal
import statistics
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections import Counter

# name on the command line -> (file name, SHA-256 of the published file, raw dump it is rebuilt from)
BENCHMARKS = {
    "beauty": ("Beauty.txt", "226cce9c3105299ca0db9615d7d3fb32b3175e90da43100ae352599f0f0107b8",
               "reviews_Beauty_5.json.gz"),
    "toys": ("Toys_and_Games.txt", "176c680c688d497598c4a89a03b402c0fe78d795e5db335c2e78dd5f2d778a3f",
             "reviews_Toys_and_Games_5.json.gz"),
    "sports": ("Sports_and_Outdoors.txt", "2a095e0648872beb9982408958290f5d655db5be2911c3756b5446de9f0b8de2",
               "reviews_Sports_and_Outdoors_5.json.gz"),
    "yelp": ("Yelp.txt", "724b219106b81dd2349027da997334ddb6da9fe2f152ad6e0d97a93170f7caed",
             "yelp_academic_dataset_review.json"),
}
DOWNLOAD_URL = "https://raw.githubusercontent.com/aHuiWang/CIKM2020-S3Rec/master/data/"
DATA_DIR_VARIABLE = "UNIFORM_SEQREC_DATA"  # overrides the default data folder ./data (tests and CI use it)
MIN_ITEMS = 3  # a user needs a training item, a validation item and a test item
K_CORE = 5     # users and items with fewer interactions are dropped (paper appendix A)
YELP_FIRST, YELP_LAST = "2019-01-01 00:00:00", "2019-12-31 00:00:00"  # S3-Rec's Yelp window



def start_program(name):
    """What a program of this project does first, before torch loads (which takes seconds): Ctrl-C meanwhile is one
    line, and a working directory that no longer exists is said plainly (importing torch there ends in "oneMKL FATAL
    ERROR: Cannot load ..."). The program's own handling takes over once it runs."""
    signal.signal(signal.SIGINT, lambda *_: (print(f"{name}: interrupted while starting; nothing was changed",
                                                   file=sys.stderr), sys.exit(130)))
    try:
        os.getcwd()
    except FileNotFoundError:
        print(f"{name}: error: the working directory no longer exists (deleted or moved); cd into a folder that "
              f"exists and run again", file=sys.stderr)
        sys.exit(2)

class DataError(ValueError):
    """A data file or data name that cannot be used; the message is one line naming the problem."""


def default_data_dir():
    return os.environ.get(DATA_DIR_VARIABLE) or "data"


def benchmark_path(name, data_dir):
    return os.path.join(data_dir, BENCHMARKS[name][0])


# ---------------------------------------------------------------------------------------------------------------
# Reading and checking a data file
# ---------------------------------------------------------------------------------------------------------------

MAX_ID = 2 ** 63 - 1  # ids index torch's int64 tensors


def read_sequences(path):
    """Read a one-line-per-user file into a list of item-id lists, in file order.

    Accepts what text editors and spreadsheets leave behind where the meaning is clear: a UTF-8 byte-order mark,
    UTF-16 with a byte-order mark (Notepad's and Excel's "Unicode"), LF, CRLF or CR line endings, tabs or any
    whitespace between ids, trailing whitespace, blank lines (a line is a user only with its id), no final newline,
    a final Ctrl-Z. Raises DataError, naming the file and, where there is one, the line: a missing file, a folder,
    an unreadable or empty file, NUL bytes, bytes that are not UTF-8 text, a token that is not an integer id, an id
    below 1 (0 is padding) or above 2**63 - 1 (the machine's integers), a user listed twice, and a user with fewer
    than 3 items.
    """
    if not os.path.exists(path):
        raise DataError(f"no such data file: {path}")
    if os.path.isdir(path):
        raise DataError(f"{path} is a folder, not a data file")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}") from None
    lines = decoded_lines(path, raw)
    if not any(line.strip() for line in lines):
        raise DataError(f"{path} is empty")
    sequences, line_of_user = [], {}
    for number, line in enumerate(lines, start=1):
        tokens = line.split()                                               # any whitespace, NBSP included
        if not tokens:
            continue                                                        # a blank line is no user
        ids = [integer_id(path, number, token) for token in tokens]
        user, items = ids[0], ids[1:]
        if user in line_of_user:
            raise DataError(f"{path} line {number}: user {user} already appears on line {line_of_user[user]}")
        line_of_user[user] = number
        if len(items) < MIN_ITEMS:
            raise DataError(f"{path} line {number}: user {user} has {len(items)} item(s); at least {MIN_ITEMS} "
                            f"are needed (training, validation, test)")
        sequences.append(items)
    return sequences


def line_and_column(raw, position):
    """1-based line and column of byte `position`, counting LF, CRLF and CR as line ends."""
    before = raw[:position].replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    return before.count(b"\n") + 1, len(before) - before.rfind(b"\n")


def decoded_lines(path, raw):
    """The text lines of a data file's bytes: UTF-8 (ASCII included) or UTF-16 with a byte-order mark."""
    for bom, codec in ((codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"),
                       (codecs.BOM_UTF16_BE, "utf-16-be")):
        if raw.startswith(bom):
            raw = raw[len(bom):]
            break
    else:
        codec = "utf-8"
    if codec != "utf-8":
        try:
            text = raw.decode(codec)
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: {codec.upper()} byte-order mark, but byte {err.start + 2} does not decode "
                            f"({err.reason}); save the file as UTF-8") from None
    else:
        if b"\x00" in raw:
            if len(raw) >= 4 and (not any(raw[1::2]) or not any(raw[0::2])):
                raise DataError(f"{path} looks like UTF-16 without a byte-order mark (every other byte is NUL); "
                                f"save it as UTF-8")
            number, column = line_and_column(raw, raw.index(b"\x00"))
            raise DataError(f"{path} line {number}: NUL byte at column {column}; is the file damaged or not text?")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            number, column = line_and_column(raw, err.start)
            raise DataError(f"{path} line {number}: byte 0x{raw[err.start]:02x} at column {column} is not UTF-8 "
                            f"text; expected lines of integer ids") from None
    if "\x00" in text:
        number = text[:text.index("\x00")].replace("\r\n", "\n").replace("\r", "\n").count("\n") + 1
        raise DataError(f"{path} line {number}: NUL character; is the file damaged or not text?")
    if text.endswith("\x1a"):                                                # DOS end-of-file mark
        text = text[:-1]
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if lines[-1] == "":
        lines.pop()                                                         # the final newline
    return lines


def integer_id(path, number, token):
    """One token of line `number` as an id in 1 .. MAX_ID, or a DataError saying what is wrong with it."""
    shown = token if len(token) <= 40 else f"{token[:20]}...({len(token)} characters)"
    digits = token[1:] if token.startswith("-") else token
    if not digits.isdecimal():                                              # the digits int() reads, and only them
        hint = " (ids are separated by spaces or tabs, not commas)" if "," in token or ";" in token else ""
        raise DataError(f"{path} line {number}: '{shown}' is not an integer id{hint}")
    significant = digits.lstrip("0")                                       # int() refuses over 4,300 digits
    if token.startswith("-") or not significant:
        raise DataError(f"{path} line {number}: id {shown} is invalid (ids start at 1; 0 is padding)")
    if len(significant) > len(str(MAX_ID)) or int(significant) > MAX_ID:
        raise DataError(f"{path} line {number}: id {shown} is too large (ids go up to 2**63 - 1)")
    return int(significant)


def statistics_of(sequences):
    """The figures of docs/datasets.md section 6 for a list of sequences."""
    lengths = [len(s) for s in sequences]
    frequency = Counter(i for s in sequences for i in s)
    users, items, interactions = len(sequences), len(frequency), sum(lengths)
    median = statistics.median(lengths)
    return {
        "users": users, "items": items, "interactions": interactions,
        "average length": round(interactions / users, 3), "min length": min(lengths),
        "median length": median if not float(median).is_integer() else int(median), "max length": max(lengths),
        "min item frequency": min(frequency.values()), "max item frequency": max(frequency.values()),
        "density %": round(100 * interactions / (users * items), 4),
        "largest item id": max(frequency), "users with a repeated item": sum(len(set(s)) < len(s) for s in sequences),
    }


def format_warnings(sequences):
    """Properties the published files have; a file without them still loads, but is not S3-Rec-shaped."""
    warnings = []
    frequency = Counter(i for s in sequences for i in s)
    if max(frequency) != len(frequency):
        warnings.append(f"item ids are not contiguous: {len(frequency)} items but the largest id is {max(frequency)}")
    short_users = sum(len(s) < K_CORE for s in sequences)
    if short_users:
        warnings.append(f"{short_users} users have fewer than {K_CORE} items (not a {K_CORE}-core)")
    rare_items = sum(c < K_CORE for c in frequency.values())
    if rare_items:
        warnings.append(f"{rare_items} items occur fewer than {K_CORE} times (not a {K_CORE}-core)")
    return warnings


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Landing files in the data folder: a verified file is never replaced by anything else, and nothing is half-written
# ---------------------------------------------------------------------------------------------------------------

def rebuilt_path(name, data_dir):
    """Where a rebuild that differs from the published file lands: beside it, e.g. Beauty.rebuilt.txt, so that the
    benchmark's own name always means the published file (the trainer's --data beauty and users take it so)."""
    stem, extension = os.path.splitext(BENCHMARKS[name][0])
    return os.path.join(data_dir, f"{stem}.rebuilt{extension}")


def verified_present(target, expected_sha):
    """True when `target` is present with the published checksum, False when absent; DataError when something else
    is there: it may be someone's own file, and replacing it would lose it."""
    if not os.path.lexists(target):
        return False
    if os.path.isfile(target) and sha256_of(target) == expected_sha:
        return True
    what = "is present but is not the published file (its SHA-256 differs)" if os.path.isfile(target) else \
        "is present but is not a file"
    raise DataError(f"{target} {what}; nothing was replaced: move it away (or train on it with --data {target}) "
                    f"and run again")


def check_data_dir(data_dir):
    """DataError when `data_dir` cannot be the data folder: an empty name, or a file. Creates nothing, so that a
    rebuild can check before it spends minutes reading a dump."""
    if not data_dir:
        raise DataError("the data folder's name is empty (--data-dir '')")
    if os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise DataError(f"the data folder {data_dir} is a file, not a folder")


def make_data_dir(data_dir):
    check_data_dir(data_dir)
    try:
        os.makedirs(data_dir, exist_ok=True)
    except OSError as err:
        raise DataError(f"cannot make the data folder {data_dir} ({err.strerror or err})") from None


def new_partial(data_dir, file_name):
    """A new hidden `.<file_name>.<random>.part` in `data_dir` open for writing, and its path; renamed over the real
    name only once complete and checked, so an interruption never leaves a half-written file under that name.

    Created as open() creates files (0666 less the umask, usually 0644): tempfile.mkstemp's 0600 made the data
    files unreadable to anyone else sharing the folder."""
    remove_stale_partials(data_dir, file_name)
    partial = os.path.join(data_dir, f".{file_name}.{secrets.token_hex(8)}.part")
    try:
        handle = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    except OSError as err:
        raise DataError(f"cannot write into the data folder {data_dir} ({err.strerror or err})") from None
    return os.fdopen(handle, "wb"), partial


# A partial file untouched this long is a writer's that was killed (SIGKILL, a power cut: nothing could remove it).
# A live writer touches its own with every block it writes, and another process may be writing one now (a second
# `data_prep.py all`, perhaps on another machine sharing the folder), so a recent one is left alone.
STALE_PARTIAL_SECONDS = 3600


def remove_stale_partials(data_dir, file_name):
    """Remove the `.<file_name>.<random>.part` files of `data_dir` left by killed writers (STALE_PARTIAL_SECONDS)."""
    try:
        names = os.listdir(data_dir)
    except OSError:
        return                                                              # no folder yet: nothing left behind
    for name in names:
        if name.startswith(f".{file_name}.") and name.endswith(".part"):
            path = os.path.join(data_dir, name)
            try:
                if time.time() - os.path.getmtime(path) > STALE_PARTIAL_SECONDS:
                    os.remove(path)
            except OSError:                                                 # gone meanwhile, or not ours to remove
                pass


def land(partial, path):
    """Rename the complete, checked `partial` to `path` in one step (readers see the old file or the new one)."""
    try:
        os.replace(partial, path)
    except OSError as err:                                                  # e.g. a folder of that name
        raise DataError(f"cannot write {path} ({err.strerror or err}); nothing was written") from None


def remove_partial(partial):
    if os.path.exists(partial):
        os.remove(partial)


# ---------------------------------------------------------------------------------------------------------------
# Downloading the published files
# ---------------------------------------------------------------------------------------------------------------

class DownloadFailed(DataError):
    """The network or the server failed (not the file): the remedy is to get the file some other way."""


def download(name, data_dir, base_url=DOWNLOAD_URL, log=print):
    """Get benchmark `name` (beauty, toys, sports, yelp) into folder `data_dir` as `python data_prep.py NAME` does, and
    return its path. Other modules call this for a missing benchmark (uniform_seqrec.py for --data beauty).

    A file present with the published SHA-256 is kept as it is (no fetch). Otherwise the file is fetched from
    `base_url`, an http(s) URL or a local folder holding the files (a path or a file:// URL), checked, and only then
    renamed into place: nothing is half-written, and a file present that is not the published one is never replaced.
    `log` gets one line saying what happened. Raises DataError with a one-line message; DownloadFailed when the
    network failed, its message naming the remedy: copy the file into `data_dir`, or
    `python data_prep.py NAME --data-dir DIR --url FOLDER` with a local folder holding it.
    """
    if name not in BENCHMARKS:
        raise DataError(f"unknown benchmark '{name}': not one of {', '.join(BENCHMARKS)}")
    try:
        return fetch(name, data_dir, base_url, log)
    except DownloadFailed as err:
        raise DownloadFailed(f"{err}; {offline_remedy([name], data_dir)}") from None


def download_all(data_dir, base_url=DOWNLOAD_URL, log=print):
    """`python data_prep.py all`: fetch each of the four, trying every one even when one fails (`log` says how each
    went), then a DataError naming those not obtained and, when the network failed, the remedy."""
    check_data_dir(data_dir)
    source_of(base_url)                                                     # a bad --url once, not four times
    failed = []
    for name in BENCHMARKS:
        try:
            fetch(name, data_dir, base_url, log)
        except DataError as err:
            log(f"{BENCHMARKS[name][0]}: not obtained: {err}")
            failed.append((name, err))
    if failed:
        offline = [name for name, err in failed if isinstance(err, DownloadFailed)]
        raise DataError(f"could not get {', '.join(BENCHMARKS[name][0] for name, _ in failed)} (the first: "
                        f"{failed[0][1]})" + (f"; {offline_remedy(offline, data_dir)}" if offline else ""))


def offline_remedy(names, data_dir):
    """What to do when benchmarks `names` cannot be downloaded: copy them in by hand, or --url a local copy."""
    folder, files = os.path.abspath(data_dir), ", ".join(BENCHMARKS[name][0] for name in names)
    command, them = (names[0], "it") if len(names) == 1 else ("all", "them")
    return (f"without network, copy {files} into {folder}, or run: python data_prep.py {command} --data-dir {folder} "
            f"--url FOLDER (a local folder or mirror holding {them})")


def fetch(name, data_dir, base_url, log):
    """download() without the remedy in its message."""
    file_name, expected_sha, _ = BENCHMARKS[name]
    target = os.path.join(data_dir, file_name)
    check_data_dir(data_dir)
    kind, where = source_of(base_url)
    if verified_present(target, expected_sha):
        log(f"{target}: present, checksum ok")
        return target
    if kind == "folder" and not os.path.isdir(where):
        raise DataError(f"--url {base_url}: no such folder (give an http(s):// URL, or a local folder holding the "
                        f"files)")
    make_data_dir(data_dir)
    out, partial = new_partial(data_dir, file_name)
    try:
        try:
            with out:
                source = (copy_file if kind == "folder" else copy_url)(where, file_name, out, data_dir)
        except OSError as err:                                               # closing writes the last buffered block
            raise write_error(data_dir, err) from None
        actual_sha = sha256_of(partial)
        if actual_sha != expected_sha:
            raise DataError(f"{source}: checksum mismatch (got {actual_sha[:16]}..., expected {expected_sha[:16]}...); "
                            f"nothing was written")
        land(partial, target)
    finally:
        remove_partial(partial)
    log(f"{target}: downloaded, checksum ok")
    return target


def source_of(base_url):
    """('web', URL) for an http(s) URL; ('folder', path) for a local folder, given as a path or a file:// URL (the
    remedy on a machine without network); DataError for anything else: an empty URL, another scheme, a bad port."""
    if not base_url.strip():
        raise DataError("--url is empty; give an http(s):// URL, or a local folder holding the files")
    if any(ord(c) < 32 or ord(c) == 127 for c in base_url):                  # a newline would split the error line
        raise DataError(f"--url {base_url!r} contains a control character")
    if os.path.isdir(base_url):
        return "folder", base_url                                           # even one whose name looks like a URL
    try:
        parts = urllib.parse.urlsplit(base_url)
        parts.port                                                          # a bad port is a ValueError only here
    except ValueError as err:
        raise DataError(f"--url {base_url} is not a valid URL ({err})") from None
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        if not parts.hostname:
            raise DataError(f"--url {base_url} names no host")
        return "web", base_url
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise DataError(f"--url {base_url}: a file:// URL names a folder on this machine (file:///path/to/folder)")
        return "folder", urllib.request.url2pathname(parts.path)
    if len(scheme) > 1:                                                     # one letter is a Windows drive, C:\\data
        raise DataError(f"--url {base_url}: unsupported scheme {scheme}:// (use http://, https://, file:// or a "
                        f"folder)")
    return "folder", base_url


def copy_file(folder, file_name, out, data_dir):
    path = os.path.join(folder, file_name)
    try:
        with open(path, "rb") as f:
            copy_blocks(f.read, out, file_name, os.fstat(f.fileno()).st_size, data_dir)
    except OSError as err:
        raise DataError(f"cannot read {path} ({err.strerror or err}); nothing was written") from None
    return path


def copy_url(base_url, file_name, out, data_dir):
    url = base_url.rstrip("/") + "/" + file_name
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            length = response.headers.get("Content-Length", "").strip()    # garbage there is no length
            total = int(length) if length.isdecimal() else 0
            received = copy_blocks(response.read, out, file_name, total, data_dir)
    except (OSError, http.client.HTTPException) as err:                     # URLError, HTTPError, timeouts
        raise DownloadFailed(f"download of {url} failed ({failure_reason(err)}); nothing was written") from None
    if received < total:                                                    # read() just ends when the server hangs up
        raise DownloadFailed(f"download of {url} failed (the connection closed after {received:,} of {total:,} "
                             f"bytes); nothing was written")
    return url


def failure_reason(err):
    """A failed download in words: 'HTTP 503 Service Unavailable', 'Connection refused', 'IncompleteRead(...)'."""
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    if isinstance(err, http.client.HTTPException):
        return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
    reason = getattr(err, "reason", None) or err                            # URLError wraps the socket's error
    return getattr(reason, "strerror", None) or str(reason)


def copy_blocks(read, out, label, total, data_dir):
    """Copy read(64 KiB) blocks into `out` until b""; returns the bytes copied. A failed write is a DataError here,
    so that an OSError out of this function is one of reading (the network, the source folder). Progress goes to
    stderr on a terminal only, where \\r redraws one line; in a log or a test it would be noise before the one error
    line."""
    received, show = 0, sys.stderr.isatty()
    try:
        for block in iter(lambda: read(1 << 16), b""):
            try:
                out.write(block)
            except OSError as err:
                raise write_error(data_dir, err) from None
            received += len(block)
            if show:
                done = f"{received / 1024:,.0f} of {total / 1024:,.0f} KiB" if total else f"{received / 1024:,.0f} KiB"
                print(f"\r{label}: {done}", end="", file=sys.stderr, flush=True)
    finally:
        if show and received:
            print(file=sys.stderr)
    return received


def write_error(data_dir, err):
    return DataError(f"cannot write into the data folder {data_dir} ({err.strerror or err}); nothing was written")


# ---------------------------------------------------------------------------------------------------------------
# Rebuilding from the raw review dumps (docs/datasets.md sections 3-4)
# ---------------------------------------------------------------------------------------------------------------

AMAZON_FIELDS = ("reviewerID", "asin", "unixReviewTime")  # what a rebuild reads of a record ("overall" optional)
YELP_FIELDS = ("user_id", "business_id", "date", "stars")
YELP_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}")


def read_amazon_reviews(path):
    """(user, item, time) per review of an Amazon 2014 `reviews_<Category>_5.json.gz`, in file order.

    A record that is not as documented (not a JSON object, a field missing, null or of another type) is a
    DataError naming the file and the line: a rebuild from it would be wrong, or fail later less clearly."""
    for number, text in raw_lines(path):
        try:
            review = json_record(text, AMAZON_FIELDS)
            user, item = text_field(review, "reviewerID", AMAZON_FIELDS), text_field(review, "asin", AMAZON_FIELDS)
            time = time_field(review, "unixReviewTime", AMAZON_FIELDS)
            rating = rating_field(review, "overall", AMAZON_FIELDS) if "overall" in review else 1.0
        except DataError as err:
            raise DataError(f"{path} line {number}: {err}") from None
        if rating > 0:
            yield user, item, time


def read_yelp_reviews(path):
    """(user, business, time) per 2019 review of `yelp_academic_dataset_review.json`, in file order.

    The window and the timestamp (the digits of `date` as one integer) are S3-Rec's; repeats are kept. Every
    record is checked, in the window or not, as in read_amazon_reviews; `date` must be `YYYY-MM-DD hh:mm:ss`,
    since the window is a string comparison and the timestamp its digits (a date without time would sort wrong).
    """
    for number, text in raw_lines(path):
        try:
            review = json_record(text, YELP_FIELDS)
            user, business = text_field(review, "user_id", YELP_FIELDS), text_field(review, "business_id", YELP_FIELDS)
            date, stars = date_field(review, "date", YELP_FIELDS), rating_field(review, "stars", YELP_FIELDS)
        except DataError as err:
            raise DataError(f"{path} line {number}: {err}") from None
        if YELP_FIRST <= date <= YELP_LAST and stars > 0:
            yield user, business, int("".join(c for c in date if c.isdigit()))


def raw_lines(path):
    """(line number, text) of each non-blank line of a raw dump, gzip-compressed or not.

    Compression is told by the first two bytes, not the name: the dumps circulate both ways. Decoding line by line
    lets a byte that is not UTF-8 be reported with its line."""
    with open(path, "rb") as f:
        compressed = f.read(2) == b"\x1f\x8b"
    number = 0
    try:
        with (gzip.open if compressed else open)(path, "rb") as f:
            for number, line in enumerate(f, start=1):
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise DataError(f"{path} line {number}: byte 0x{line[err.start]:02x} at column {err.start + 1} "
                                    f"is not UTF-8 text") from None
                if text.strip():
                    yield number, text
    except (EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise DataError(f"{path}: the compressed data ends early or is damaged after line {number} ({err}); "
                        f"an incomplete download?") from None


def json_shown(value):
    """A field's value as the JSON text it was, shortened: null, true, "soon", 1.5."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."


def json_record(text, fields):
    try:
        record = json.loads(text)
    except ValueError as err:
        raise DataError(f"not JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(record, dict):
        raise DataError(f"{json_shown(record)} is not a review record (a JSON object with {', '.join(fields)})")
    return record


def present(record, key, fields):
    if key not in record:
        raise DataError(f"the record has no {key} (a JSON object with {', '.join(fields)})")
    return record[key]


def text_field(record, key, fields):
    """An id: a non-empty string (a null or a number would silently become a user "None" or mix with "7")."""
    value = present(record, key, fields)
    if not isinstance(value, str) or not value:
        raise DataError(f"{key} is {json_shown(value)}, not a non-empty string")
    return value


def time_field(record, key, fields):
    """A time in seconds: an integer, or a string of digits as S3-Rec's int() reads; never a fraction or a bool."""
    value = present(record, key, fields)
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataError(f"{key} is {json_shown(value)}, not a whole number of seconds")
    return value


def rating_field(record, key, fields):
    """A rating: a finite JSON number (NaN would silently fail the rating filter and drop the review)."""
    value = present(record, key, fields)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"{key} is {json_shown(value)}, not a number")
    return value


def date_field(record, key, fields):
    value = present(record, key, fields)
    try:
        if not isinstance(value, str) or not YELP_DATE.fullmatch(value):
            raise ValueError
        datetime.datetime.strptime(value, "%Y-%m-%d %H:%M:%S")              # a real date: no month 13
    except ValueError:
        raise DataError(f"{key} is {json_shown(value)}, not a date and time YYYY-MM-DD hh:mm:ss") from None
    return value


def build_sequences(reviews, k=K_CORE):
    """Users in order of first appearance, each list stably sorted by time (ties keep file order),
    then the iterative k-core, then ids re-numbered 1.. by first appearance. Returns a list of id lists."""
    by_user = {}
    for user, item, time in reviews:
        by_user.setdefault(user, []).append((time, item))
    sequences = [[item for _, item in sorted(events, key=lambda e: e[0])] for events in by_user.values()]
    while True:
        frequency = Counter(i for s in sequences for i in s)
        kept = [[i for i in s if frequency[i] >= k] for s in sequences if len(s) >= k]
        kept = [s for s in kept if s]
        if kept == sequences:
            break
        sequences = kept
    new_id = {}
    return [[new_id.setdefault(i, len(new_id) + 1) for i in s] for s in sequences]


def write_sequences(sequences, out):
    """Write `uid iid ...` lines to binary file `out`: uid = line number, LF endings, final newline."""
    for user, items in enumerate(sequences, start=1):
        out.write((" ".join(map(str, [user, *items])) + "\n").encode("ascii"))


def rebuild(name, raw_path, data_dir, log=print):
    """Rebuild a benchmark file from its raw dump; True when it matches the published checksum.

    One that matches lands as the benchmark's file (e.g. Beauty.txt); one that differs lands beside it as
    rebuilt_path() says (replacing an earlier rebuild there), never under the benchmark's name, and the log line
    says how to train on it. A dump that leaves no user, or a file present under the benchmark's name that is not
    the published one, is a DataError, and nothing is written.
    """
    if os.path.isdir(raw_path):
        raise DataError(f"{raw_path} is a folder, not a raw review dump")
    if not os.path.isfile(raw_path):
        raise DataError(f"no such raw file: {raw_path}")
    check_data_dir(data_dir)
    reader = read_yelp_reviews if name == "yelp" else read_amazon_reviews
    try:
        reviews = list(reader(raw_path))                                   # a bad record is a DataError already
    except OSError as err:
        raise DataError(f"cannot read {raw_path} ({err.strerror or err})") from None
    if not reviews:
        raise DataError(f"{raw_path} holds no reviews{' from 2019' if name == 'yelp' else ''}; nothing was written")
    sequences = build_sequences(reviews)
    if not sequences:
        raise DataError(f"{raw_path}: no user is left after the {K_CORE}-core ({len(reviews)} reviews); "
                        f"nothing was written")
    file_name, expected_sha, _ = BENCHMARKS[name]
    target = os.path.join(data_dir, file_name)
    make_data_dir(data_dir)
    out, partial = new_partial(data_dir, file_name)
    try:
        try:
            with out:
                write_sequences(sequences, out)
        except OSError as err:
            raise write_error(data_dir, err) from None
        if sha256_of(partial) != expected_sha:
            landed = rebuilt_path(name, data_dir)
            land(partial, landed)
            log(f"{landed}: rebuilt, {len(sequences)} users; DIFFERS from the published checksum, so it is not named "
                f"{file_name}; train on it with --data {landed}")
            return False
        if verified_present(target, expected_sha):
            log(f"{target}: rebuilt, {len(sequences)} users; matches the published checksum, as does the file present")
        else:
            land(partial, target)
            log(f"{target}: rebuilt, {len(sequences)} users; matches the published checksum")
        return True
    finally:
        remove_partial(partial)


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------

class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a bad command line gives one line naming the problem (exit code 2), no usage dump."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser():
    parser = OneLineErrorParser(
        prog="data_prep.py",
        description="Download (SHA-256 checked), rebuild from raw dumps, or inspect the benchmark files.",
        epilog="examples:  python data_prep.py all  |  python data_prep.py beauty --from-raw "
               "reviews_Beauty_5.json.gz  |  python data_prep.py --stats data/Beauty.txt")
    parser.add_argument("dataset", nargs="?", choices=[*BENCHMARKS, "all"],
                        help="which benchmark to get: beauty, toys, sports, yelp or all")
    parser.add_argument("--data-dir", default=default_data_dir(),
                        help=f"folder of the data files (default: ${DATA_DIR_VARIABLE} or ./data)")
    parser.add_argument("--from-raw", metavar="RAW_FILE",
                        help="rebuild from a raw dump (reviews_<Category>_5.json.gz, or the Yelp review JSON)")
    parser.add_argument("--stats", metavar="FILE", help="print statistics of a data file and check its format")
    parser.add_argument("--url", metavar="URL_OR_FOLDER",                 # None: not given (an error with --from-raw)
                        help=f"where the published files are: an http(s):// base URL (default {DOWNLOAD_URL}), or, "
                             f"on a machine without network, a local folder holding them, as a path or a file:// URL")
    return parser


def print_stats(path):
    sequences = read_sequences(path)
    print(f"{path}  (sha256 {sha256_of(path)})")
    for key, value in statistics_of(sequences).items():
        print(f"  {key:28s} {value:,}" if isinstance(value, int) else f"  {key:28s} {value}")
    for warning in format_warnings(sequences):
        print(f"  warning: {warning}")


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = run(parser, args)
        sys.stdout.flush()                                                  # a closed pipe shows here, not at exit
    except DataError as err:
        print(f"data_prep.py: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:                                               # each writer removed its partial file
        print("data_prep.py: interrupted; no file was left half-written", file=sys.stderr)
        return 130
    except BrokenPipeError:                                                 # `--stats FILE | head` stopped reading
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())      # so that the exit's flush is quiet
        return 1
    return code


def run(parser, args):
    """The command the options name; its exit status."""
    if args.stats is not None:
        if not args.stats:
            parser.error("--stats needs a file name")
        if args.dataset or args.from_raw is not None or args.url is not None:
            parser.error("--stats FILE inspects a file; give it without a dataset, --from-raw or --url")
        print_stats(args.stats)
    elif args.dataset is None:
        parser.error("name a dataset (beauty, toys, sports, yelp, all) or give --stats FILE")
    elif args.from_raw is not None:                                         # '' too: it once meant "download"
        if not args.from_raw:
            parser.error("--from-raw needs a file name")
        if args.dataset == "all":
            parser.error("--from-raw rebuilds one dataset at a time")
        if args.url is not None:
            parser.error("--url is where downloads come from, --from-raw rebuilds from a dump: give one of them")
        return 0 if rebuild(args.dataset, args.from_raw, args.data_dir) else 1
    elif args.dataset == "all":
        download_all(args.data_dir, DOWNLOAD_URL if args.url is None else args.url)
    else:
        download(args.dataset, args.data_dir, DOWNLOAD_URL if args.url is None else args.url)
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)              # `kill`: clean up as for Ctrl-C
    sys.exit(main())
