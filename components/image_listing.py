"""Finding a dataset's images: which files, with which label, in which split.

Listing runs in one process, before any image is opened, and is the serial
part of ingest (the encoding runs on Beam's workers, see
``components.ingest_beam``).  It only reads folders and CSV files: a file that
cannot be an image of the dataset (outside a class folder, missing from the
disk, listed twice) becomes a reject here, a file that is not a good image is
found later by ``components.image_encoding``.

Two classification input layouts are accepted (the same for the main and the test source):

* a class-per-folder tree, ``source/<class>/**/<image>``, as
  ``tf.keras.utils.image_dataset_from_directory`` expects;
* images listed in CSV files (``data.labels_csv``, a path or glob relative to
  ``source``), each row giving a filename (relative to the CSV's folder, or
  else to ``source``) and a label, as GTSRB ships them.

Segmentation sources hold image/mask pairs instead, paired by
``components.masks.list_pairs``.

Never listed: hidden files and folders (counted in ``Hidden``), links leaving
their class folder (``cat/x -> ../dog`` would label dogs "cat") and CSV rows
naming paths outside the source (both rejects).  Class names are single lines
without control characters, no two alike up to NFC/NFD or surrounding spaces.

Splits are decided by a hash of each file's relative path (or of the group
``data.split_group_regex`` finds in it), so adding images never moves an
existing image between train and eval.  Without ``data.classes`` the classes
are every label found, in natural order ("class2" before "class10").
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import glob
import hashlib
import io
import os
import re
from typing import TYPE_CHECKING, Dict, Iterator, List, Optional, Sequence, Tuple

from visiontune.components import masks
from visiontune.components.class_names import check_distinct_labels, label_problem, natural_key  # noqa: F401 - re-exported
from visiontune.errors import UserError

if TYPE_CHECKING:  # pragma: no cover - only for type checkers
    from visiontune.configs import DataConfig, SegmentationConfig

TRAIN, EVAL, TEST = "train", "eval", "test"


# Defined here, not in ``prepare`` (which re-exports it): listing raises most of
# them, and it may not import ``prepare``, which imports it.
class PrepareError(UserError, ValueError):
    """The data source or settings cannot be turned into a dataset at all.

    Problems with single files are not errors: they become rows of
    ``rejects.csv`` so that one bad image does not stop 50,000 good ones.
    """


@dataclasses.dataclass(frozen=True)
class _Item:
    """One candidate image: where to read it and what it will be called."""

    path: str  # as given (source joined with the relative name), used to read and report
    relpath: str  # posix path relative to the source root: hashed and stored as ``filename``
    label: str
    split: str
    mask: str = ""  # segmentation: the mask file paired with the image


@dataclasses.dataclass
class Hidden:
    """Hidden files and folders (names starting with "."), skipped unread but counted."""

    files: int = 0
    folders: int = 0

    def count(self, is_dir: bool) -> None:
        self.folders, self.files = self.folders + is_dir, self.files + (not is_dir)

    def describe(self) -> str:
        return " and ".join(f"{n} hidden {what}{'' if n == 1 else 's'}"
                            for n, what in ((self.files, "file"), (self.folders, "folder")) if n)


# --------------------------------------------------------------------------
# Class order and splits
# --------------------------------------------------------------------------


def split_fraction(relpath: str) -> float:
    """Where a file falls in [0, 1): a pure function of its relative path.

    Depending on nothing but the path is what keeps existing files in their
    split when files are added or removed around them.
    """
    digest = hashlib.sha256(relpath.encode("utf-8")).digest()
    # The top 53 of the first 64 bits: exactly representable, so never 1.0.
    return (int.from_bytes(digest[:8], "big") >> 11) / 2.0 ** 53


def split_key(relpath: str, group_regex: str = "") -> str:
    """What decides a file's split: its path, or the group a regex finds in it.

    Near-duplicates (several video frames of one physical sign, as GTSRB's
    ``TTTTT_FFFFF.ppm`` tracks) must fall on the same side, or the eval split
    measures memory instead of generalisation.  With ``group_regex`` the
    regex's first group (or whole match) is hashed instead of the path; files
    it does not match keep their own path as the key.
    """
    if group_regex:
        match = re.search(group_regex, relpath)
        if match:
            group = match.group(1) if match.groups() else match.group(0)
            return f"group:{group}"
    return relpath


# --------------------------------------------------------------------------
# Finding the images
# --------------------------------------------------------------------------


def _collect_items(data: "DataConfig", segmentation: Optional["SegmentationConfig"] = None
                   ) -> Tuple[List[_Item], List[Tuple[str, str]], Hidden]:
    """All candidate images with their split, the files already known to be bad, and the hidden ones."""
    items: List[_Item] = []
    rejects: List[Tuple[str, str]] = []
    hidden = Hidden()
    sources = [(data.source, data.labels_csv, None)]
    if data.test_source:
        sources.append((data.test_source, data.test_labels_csv, TEST))
    from visiontune.components import remote_listing

    for source, labels_csv, split in sources:
        remote = remote_listing.is_url(source)
        if remote:
            remote_listing.check_folder(source)
        elif not os.path.isdir(source):
            raise PrepareError(f"{source}: data source folder does not exist"
                               if not os.path.exists(source) else
                               f"{source}: data source is not a folder")
        mask_of: Dict[str, str] = {}
        if remote and segmentation is None:
            found, bad = (remote_listing.list_csv(source, labels_csv, data) if labels_csv
                          else remote_listing.list_tree(source, hidden))
        elif segmentation is not None:
            def is_listed(name: str) -> bool:  # of files: hidden ones are counted
                hidden.files += _is_hidden(name)
                return not _is_skipped_file(name)
            try:
                pairs, bad = masks.list_pairs(source, segmentation.image_dir, segmentation.mask_dir,
                                              segmentation.mask_regex, segmentation.mask_template,
                                              is_listed, remote_listing.UrlFolders if remote
                                              else masks.LocalFolders)
            except FileNotFoundError as e:
                raise PrepareError(str(e)) from None
            found = [(path, relpath, "") for path, relpath, _ in pairs]
            mask_of = {path: mask for path, _, mask in pairs}
        elif labels_csv:
            found, bad = _list_csv_source(source, labels_csv, data)
        else:
            found, bad = _list_tree_source(source, hidden)
        rejects.extend(bad)
        for path, relpath, label in found:
            key = split_key(relpath, data.split_group_regex)
            item_split = split or (EVAL if split_fraction(key) < data.eval_fraction else TRAIN)
            items.append(_Item(path, relpath, label, item_split, mask_of.get(path, "")))
    return items, rejects, hidden


def _inside(path: str, root: str) -> bool:
    """Whether real path ``path`` is ``root`` or below it."""
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _list_tree_source(source: str, hidden: Hidden
                      ) -> Tuple[List[Tuple[str, str, str]], List[Tuple[str, str]]]:
    """(path, relpath, label) for every file under a class-per-folder tree.

    CSV files are skipped, hidden ones counted in ``hidden``; every other file
    is listed, so a stray ``notes.txt`` is a reject rather than vanishing.
    Files directly in ``source`` have no class and are rejected.
    """
    rejects: List[Tuple[str, str]] = []
    class_dirs = []
    for name in sorted(os.listdir(source)):
        full = os.path.join(source, name)
        if _is_hidden(name):
            hidden.count(os.path.isdir(full))
        elif os.path.isdir(full):
            problem = label_problem(name)
            if problem:
                raise PrepareError(f"{full}: class folder name {name!r} {problem}")
            class_dirs.append(name)
        elif not _is_skipped_file(name):
            rejects.append((full, "not inside a class folder (expected source/<class>/<image>)"))
    if not class_dirs:
        raise PrepareError(f"{source}: no class folders (expected {source}/<class>/<image>); "
                           "set data.labels_csv if the labels are in CSV files")
    check_distinct_labels(class_dirs, "class folders")
    paths = _PathResolver(source)
    walker = _ClassTreeWalker(source, class_dirs, hidden, rejects)
    found = [(path, paths.rel(path), label) for label in class_dirs for path in walker.files(label)]
    return found, rejects


class _ClassTreeWalker:
    """Files below each class folder, each real folder and file once, no link out of its class.

    A class folder may be a link (assembled datasets): its real path is its
    root; no two roots overlap.  Below it a link is followed only into the
    source or its own root, not into another root nor to a folder holding a
    root (a loop), nor to what is listed anyway; each one not followed is a reject.
    """

    def __init__(self, source: str, class_dirs: Sequence[str], hidden: Hidden,
                 rejects: List[Tuple[str, str]]):
        self._source, self._source_real = source, os.path.realpath(source)
        self._roots = {label: os.path.realpath(os.path.join(source, label)) for label in class_dirs}
        self._hidden, self._rejects = hidden, rejects
        self._seen: Tuple[Dict[str, str], Dict[str, str]] = ({}, {})  # files, folders: real -> path
        self._label_of: Dict[str, str] = {}  # class root -> label
        for label, root in sorted(self._roots.items(), key=lambda kv: (len(kv[1]), kv[0])):
            outer = _root_holding(root, self._label_of)
            if outer is not None:
                raise PrepareError(
                    f"class folders {self._label_of[outer]!r} and {label!r} are the same folder or one "
                    f"holds the other ({outer} and {root}): their images would get both labels")
            self._label_of[root] = label

    def files(self, label: str) -> Iterator[str]:
        top = os.path.join(self._source, label)
        self._seen[1][self._roots[label]] = top
        yield from self._walk(top, self._roots[label], label)

    def _walk(self, folder: str, real: str, label: str, linked: bool = False) -> Iterator[str]:
        """As ``os.walk`` top-down, sorted; plain files are remembered only below a folder link."""
        try:
            with os.scandir(folder) as entries:
                listed = sorted((e.name, e.is_symlink(), _is_dir(e)) for e in entries)
        except OSError as e:
            self._rejects.append((folder, f"cannot list folder: {e.strerror}"))
            return
        for entries in ([e for e in listed if not e[2]], [e for e in listed if e[2]]):
            for name, is_link, is_dir in entries:
                if _is_hidden(name):
                    self._hidden.count(is_dir)
                    continue
                path = os.path.join(folder, name)
                if not (is_dir or is_link or linked):  # the common case: a plain file
                    if not _is_skipped_file(name):
                        yield path
                    continue
                if not is_dir and _is_skipped_file(name):
                    continue
                target = os.path.realpath(path) if is_link else os.path.join(real, name)
                problem = self._link_problem(target, label, is_dir) if is_link else None
                seen = self._seen[is_dir]
                if problem is None and target in seen:
                    problem = (f"link to {seen[target]}, a folder listed already: not followed" if is_dir
                               else f"the same file as {seen[target]} (one is a link): listed once")
                if problem:
                    self._rejects.append((path, problem))
                    continue
                seen[target] = path
                if is_dir:
                    yield from self._walk(path, target, label, linked or is_link)
                else:
                    yield path

    def _link_problem(self, target: str, label: str, is_dir: bool) -> Optional[str]:
        if not (_inside(target, self._source_real) or _inside(target, self._roots[label])):
            return f"link to {target}, outside the source folder: not followed"
        other = _root_holding(target, self._label_of)
        if other is not None and self._label_of[other] != label:
            return (f"link into the folder of class {self._label_of[other]!r} ({target}): not followed, "
                    f"its images would get the label {label!r}")
        held = sorted(c for c, r in self._roots.items() if is_dir and _inside(r, target))
        if held:
            return f"link to {target}, which holds the class folder {held[0]!r} (a loop): not followed"
        below = os.path.relpath(target, self._roots[label]).split(os.sep)
        if _inside(target, self._roots[label]) and not any(map(_is_hidden, below)):
            return f"link to {target}, which is listed itself: not followed"
        return None


def _root_holding(path: str, roots: Dict[str, str]) -> Optional[str]:
    """The key of ``roots`` that real path ``path`` is, or is inside, if any."""
    while path not in roots:
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent
    return path


def _is_dir(entry: "os.DirEntry") -> bool:
    with contextlib.suppress(OSError):
        return entry.is_dir()  # follows links, as os.walk does
    return False


class _PathResolver:
    """Paths of listed files, with each folder's part (real path, relative path,
    directory listing) computed once.

    Listing is the serial part of ingest (the encoding runs on Beam's workers).
    Resolving, normalising and ``stat``-ing every listed file from the root made
    it a third of a 2-worker GTSRB run; per folder, a listed name costs a set
    lookup and two joins.  Same results as ``os.path.normpath``,
    ``os.path.isfile``, ``os.path.realpath`` and ``os.path.relpath`` per file
    (a linked file is still resolved on its own).
    """

    def __init__(self, source: str):
        self._source = source
        self._rel: Dict[str, str] = {}  # folder -> "" or "a/b/"
        self._listing: Dict[str, Tuple[frozenset, frozenset, str]] = {}  # files, links, real path

    def _rel_prefix(self, folder: str) -> str:
        if folder not in self._rel:
            rel = os.path.relpath(folder or ".", self._source).replace(os.sep, "/")
            self._rel[folder] = "" if rel == "." else rel + "/"
        return self._rel[folder]

    def rel(self, path: str) -> str:
        """The posix path relative to the source (what is hashed and stored as ``filename``)."""
        folder, name = os.path.split(os.path.normpath(path))
        return self._rel_prefix(folder) + name

    def _listed(self, folder: str) -> Tuple[frozenset, frozenset, str]:
        if folder not in self._listing:
            try:
                with os.scandir(folder or ".") as entries:
                    listed = [(e.name, e.is_file(), e.is_symlink()) for e in entries]
            except OSError:
                listed = []
            self._listing[folder] = (frozenset(n for n, is_file, _ in listed if is_file),
                                     frozenset(n for n, _, is_link in listed if is_link),
                                     os.path.realpath(folder or "."))
        return self._listing[folder]

    def find(self, filename: str, bases: Sequence[str]
             ) -> Tuple[Optional[Tuple[str, str, str]], int, str]:
        """((path, real path, relpath) or None, folders looked in, first path outside the source).

        The first of ``bases`` holding ``filename`` as a file wins; a base where it
        would be outside the source (``../``, an absolute path) is never looked in.
        """
        plain = os.sep not in filename and not (os.altsep and os.altsep in filename) \
            and "/" not in filename and filename not in (".", "..")
        looked, outside = 0, ""
        for base in bases:
            if plain:  # the common case: no need to normalise the joined path
                folder, name = os.path.normpath(base), filename
                folder = "" if folder == "." else folder
            else:
                folder, name = os.path.split(os.path.normpath(os.path.join(base, filename)))
            prefix = self._rel_prefix(folder)
            if prefix.startswith("../"):
                outside = outside or os.path.join(folder, name)
                continue
            looked += 1
            files, links, real_folder = self._listed(folder)
            if name in files:
                path = os.path.join(folder, name)
                real = os.path.realpath(path) if name in links else os.path.join(real_folder, name)
                return (path, real, prefix + name), looked, outside
        return None, looked, outside


def _is_skipped_file(name: str) -> bool:
    return _is_hidden(name) or name.lower().endswith(".csv")


def _list_csv_source(source: str, labels_csv: str, data: "DataConfig"
                     ) -> Tuple[List[Tuple[str, str, str]], List[Tuple[str, str]]]:
    """(path, relpath, label) for every row of every CSV matching ``labels_csv``."""
    pattern = labels_csv if os.path.isabs(labels_csv) else os.path.join(source, labels_csv)
    csv_paths = sorted(glob.glob(pattern))
    if not csv_paths:
        raise PrepareError(f"{pattern}: no labels CSV matches (data.labels_csv={labels_csv!r}, "
                           f"relative to {source})")
    found: List[Tuple[str, str, str]] = []
    rejects: List[Tuple[str, str]] = []
    seen: Dict[str, Tuple[str, str]] = {}  # real path -> (csv, label) of its first row
    paths = _PathResolver(source)
    for csv_path in csv_paths:
        for filename, label, line in _read_label_rows(csv_path, data):
            where = f"{csv_path} line {line}"
            if not filename:
                rejects.append((csv_path, f"{where}: empty {data.filename_column}"))
                continue
            # Next to the CSV first (GTSRB train), else under ``source``.
            found_at, looked, outside = paths.find(filename, (os.path.dirname(csv_path), source))
            if found_at is None:
                if not looked:
                    rejects.append((outside, f"{data.filename_column} {filename!r} in {where} is outside "
                                             f"the source folder {source}: refused"))
                    continue
                rejects.append((os.path.join(os.path.dirname(csv_path), filename),
                                f"file listed in {where} not found (looked "
                                f"{'next to the CSV and ' if looked > 1 else ''}in {source})"))
                continue
            path, key, relpath = found_at
            problem = row_problem(label, where, seen.get(key))
            if problem:
                rejects.append((path, problem))
                continue
            seen[key] = (csv_path, label)
            found.append((path, relpath, label))
    return found, rejects


def row_problem(label: str, where: str, first: Optional[Tuple[str, str]]) -> Optional[str]:
    """Why a CSV row naming a file that exists is refused: its label, or the file listed before.

    ``first``: (CSV, label) of the row that listed the file first, if any.
    """
    problem = label_problem(label)
    if problem:
        return f"{where}: label {label!r} {problem}"
    if first is not None:
        first_csv, first_label = first
        return (f"listed again in {where} (first listed in {first_csv}"
                + (f" with label {first_label!r})" if first_label != label else ")"))
    return None


def decode_csv(csv_path: str, raw: bytes) -> str:
    """A labels CSV's text: UTF-8 (with or without a byte-order mark), else one line saying where it is not.

    Not guessed as Latin-1 or cp1252: a wrong guess gives labels that look
    right and differ from the class folders' and ``data.classes``' names.
    """
    raw = raw[3:] if raw.startswith(b"\xef\xbb\xbf") else raw
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise PrepareError(f"{csv_path} line {line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); save the CSV "
                           "as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)") from None


def _read_label_rows(csv_path: str, data: "DataConfig", text: Optional[str] = None
                     ) -> Iterator[Tuple[str, str, int]]:
    """(filename, label, line number) per data row (of ``text`` if given).

    Names the columns the CSV has if one is missing.
    """
    if text is None:
        try:
            with open(csv_path, "rb") as f:
                text = decode_csv(csv_path, f.read())
        except OSError as e:
            raise PrepareError(f"{csv_path}: cannot read the labels CSV: {e.strerror}") from None
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=data.csv_delimiter)
    try:
        header = [h.strip() for h in next(reader, [])]
        missing = [c for c in (data.filename_column, data.label_column) if c not in header]
        if missing:
            raise PrepareError(
                f"{csv_path}: no column {', '.join(repr(c) for c in missing)}; its columns are "
                f"{header!r} (delimiter {data.csv_delimiter!r}; see data.filename_column, "
                "data.label_column, data.csv_delimiter)")
        fi, li = header.index(data.filename_column), header.index(data.label_column)
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue  # blank line
            cells = row + [""] * (max(fi, li) + 1 - len(row))
            yield cells[fi].strip(), cells[li].strip(), reader.line_num
    except csv.Error as e:  # a NUL byte, a field over csv's size limit
        raise PrepareError(f"{csv_path} line {reader.line_num}: not a readable CSV: {e}") from None


