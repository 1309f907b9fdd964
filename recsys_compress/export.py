"""The deployable compressed artifact: ``python -m recsys_compress.export <run dir>``.

One safetensors file (no pickle) holding the model's state in its compressed encodings
(:mod:`recsys_compress.compression.codec`), the recipe to rebuild the architecture (model config,
factorised and quantised modules) and the raw user / item ids. Its size on disk is the compressed
size a run reports. :func:`load_compressed` rebuilds an inference model from it.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import pickle
import struct
import sys
import zlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np
import torch
from safetensors.torch import save
from torch import nn
from torch.overrides import TorchFunctionMode

from recsys_compress.compression.codec import (
    CHECKSUMS,
    decode_tensor,
    encode_tensor,
    payload_checksum,
)
from recsys_compress.compression.lowrank import match_state_dict
from recsys_compress.compression.targets import replace_module
from recsys_compress.config import ModelConfig, to_train_config
from recsys_compress.data.sorting import csr, dense_span, rows_of_users
from recsys_compress.errors import DataError, RecsysCompressError
from recsys_compress.models import Recommender, build_model
from recsys_compress.models.base import tables_read_once, takes_out
from recsys_compress.results import RESULTS_FILE, read_record, write_bytes

# The artifact format written: version 2 holds a CRC-32 of its payload (payload_checksum) in
# the entry CHECKSUM and is refused without it. Version 1 held a SHA-256 in "::sha256", or no
# checksum before that existed; such artifacts still load, their SHA-256 checked where present.
# A loader of version 1 refuses version 2 instead of loading it unchecked.
FORMAT = "recsys-compress/2"
ARTIFACT_NAME = "model.compressed.safetensors"
CHECKSUM_ALGORITHM = "crc32"
FORMAT_SUMS = {"recsys-compress/1": ("sha256", None), FORMAT: (CHECKSUM_ALGORITHM,)}
CHECKSUM = f"::{CHECKSUM_ALGORITHM}"


def _plain(cfg: ModelConfig) -> ModelConfig:
    """The architecture alone: the exported weights replace any pre-training."""
    return replace(cfg, pretrained_gmf=None, pretrained_mlp=None)


def describe_structure(model: nn.Module) -> dict[str, Any]:
    """How ``model`` departs from the plain architecture: low-rank modules and their ranks,
    integer (quantised) modules and their schemes, and 4-bit tensors (stored packed).

    Quantised SVD factors are listed by their own names (``user_embedding.left``, ...); the
    rank itself is read back from the saved shapes (:func:`load_compressed_state`)."""
    lowrank, quantized = {}, {}
    int4 = []
    for name, module in model.named_modules():
        if hasattr(module, "factors") and hasattr(module, "rank"):
            lowrank[name] = int(module.rank)
        if hasattr(module, "qweight"):
            quantized[name] = {
                "kind": module.rcz_group,
                "bits": module.scheme.bits,
                "group_size": module.scheme.group_size,
                "symmetric": module.scheme.symmetric,
                "scale_dtype": module.scheme.scale_dtype,
                "activation_bits": getattr(module, "activation_bits", None),
            }
        if getattr(module, "rcz_bits", 32) == 4:
            int4 += [
                f"{name}.{n}" if name else n
                for n, t in module.state_dict().items()
                if not t.is_floating_point()
            ]
    return {"lowrank": lowrank, "quantized": quantized, "int4": int4}


def load_compressed_state(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    structure: dict[str, Any],
    assign: bool = False,
) -> None:
    """Load ``state`` into a freshly built ``model``, first rebuilding the modules that were
    factorised or reduced in dimension (told by the saved shapes), then the integer modules of
    ``structure["quantized"]`` (factors of a factorised module included).

    ``assign``: the tensors of ``state`` become the model's parameters and buffers (no copy), so
    ``model`` may be built on the ``meta`` device; a tensor left without storage raises."""
    from recsys_compress.compression.qat import QuantizedEmbedding, QuantizedLinear, QuantScheme

    match_state_dict(model, state)
    for name, spec in structure.get("quantized", {}).items():
        old = model.get_submodule(name)
        scheme = QuantScheme(
            spec["bits"], spec["group_size"], spec["symmetric"], spec.get("scale_dtype", "float32")
        )
        # On a meta model, built on meta when the state holds the integers (at 1M rows the int8
        # zeros were 64 MB of fresh pages, ~40 ms, that the saved tensors then replaced); on the
        # CPU when it holds float weights, which the new module quantises on load.
        device = next(old.parameters()).device
        if device.type == "meta" and f"{name}.qweight" not in state:
            device = torch.device("cpu")
        if spec["kind"] == "embedding":
            new: nn.Module = QuantizedEmbedding(
                old.num_embeddings, old.embedding_dim, scheme, device=device
            )
        else:
            new = QuantizedLinear(
                old.in_features,
                old.out_features,
                scheme,
                bias=f"{name}.bias" in state,
                activation_bits=spec["activation_bits"],
                device=device,
            )
        replace_module(model, name, new)
    model.load_state_dict(state, assign=assign)
    empty = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if empty:
        raise KeyError(f"no saved values for {', '.join(empty)}")


def _ids_entry(ids: np.ndarray) -> tuple[dict[str, Any], torch.Tensor | None]:
    """Raw ids: a contiguous integer range is stored as its start (free); else as a tensor or
    (string ids) in the metadata."""
    if ids.dtype.kind in "iu":
        if len(ids) and np.array_equal(ids, np.arange(ids[0], ids[0] + len(ids))):
            return {"kind": "range", "start": int(ids[0]), "count": len(ids)}, None
        return {"kind": "tensor"}, torch.from_numpy(ids.astype(np.int64))
    return {"kind": "strings", "values": [str(v) for v in ids]}, None


def _ids_from(entry: dict[str, Any], tensor: torch.Tensor | None) -> np.ndarray:
    if entry["kind"] == "range":
        return np.arange(entry["start"], entry["start"] + entry["count"], dtype=np.int64)
    if entry["kind"] == "tensor":
        assert tensor is not None
        return tensor.numpy()
    return np.asarray(entry["values"], dtype=str)


def pack_metadata(meta: dict[str, Any]) -> str:
    """The artifact's metadata as ``zlib:`` + base64 of the compressed JSON: on a small model the
    plain JSON (config, structure, tensor layout) is ~2% of the file. ``unpack_metadata`` reads it
    back (and plain JSON)."""
    raw = json.dumps(meta, separators=(",", ":")).encode()
    return "zlib:" + base64.b64encode(zlib.compress(raw, 9)).decode()


def unpack_metadata(text: str) -> dict[str, Any]:
    if text.startswith("zlib:"):
        text = zlib.decompress(base64.b64decode(text[5:])).decode()
    return json.loads(text)


def export_model(
    model: Recommender,
    model_cfg: ModelConfig,
    user_ids: np.ndarray,
    item_ids: np.ndarray,
    path: Path,
) -> int:
    """Write the artifact for ``model`` (atomically); returns its size in bytes."""
    structure = describe_structure(model)
    tensors: dict[str, torch.Tensor] = {}
    infos = {}
    for name, tensor in model.state_dict().items():
        entries, info = encode_tensor(name, tensor, int4=name in structure["int4"])
        tensors.update(entries)
        infos[name] = info
    meta: dict[str, Any] = {
        "format": FORMAT,
        "model": asdict(model_cfg),
        "num_users": model.num_users,
        "num_items": model.num_items,
        "structure": structure,
        "tensors": infos,
    }
    for key, ids in (("user_ids", user_ids), ("item_ids", item_ids)):
        meta[key], tensor = _ids_entry(ids)
        if tensor is not None:
            tensors[f"::{key}"] = tensor
    text = pack_metadata(meta)
    # The checksum is a tensor: safetensors writes metadata keys in no fixed order, and one
    # metadata key keeps a re-export byte-identical.
    tensors[CHECKSUM] = payload_checksum(tensors, text, CHECKSUM_ALGORITHM)
    blob = save(tensors, metadata={"recsys_compress": text})
    write_bytes(path, blob)
    return len(blob)


@dataclass(frozen=True, eq=False)
class _IdLookup:
    """Raw ids -> internal indices: ``table[id - low]`` (-1 where no id) for integer ids of a
    short span (:func:`~recsys_compress.data.sorting.dense_span`: one load a query, where a
    binary search makes ~20 dependent ones at 1M ids; 10M queries into 1M user ids took 2.9 s
    by binary search), else a binary search over ``sorted_ids`` (through the argsort ``order``
    where the ids are not sorted already). Vectorised either way, no per-id Python object."""

    sorted_ids: np.ndarray
    order: np.ndarray | None
    low: int = 0
    table: np.ndarray | None = None

    @classmethod
    def of(cls, ids: np.ndarray) -> _IdLookup:
        ordered = len(ids) < 2 or bool(np.all(ids[1:] > ids[:-1]))
        order = None if ordered else np.argsort(ids, kind="stable")
        sorted_ids = ids if order is None else ids[order]
        if not ordered and bool(np.any(sorted_ids[1:] == sorted_ids[:-1])):
            twice = sorted_ids[1:][sorted_ids[1:] == sorted_ids[:-1]][:5].tolist()
            raise DataError(f"raw ids {twice} appear more than once: each id names one row.")
        if ids.dtype.kind not in "iu" or not len(ids):
            return cls(sorted_ids, order)
        low, high = int(sorted_ids[0]), int(sorted_ids[-1])
        if high > np.iinfo(np.int64).max or not dense_span(low, high, len(ids)):
            return cls(sorted_ids, order)
        table = np.full(high - low + 1, -1, dtype=np.int64 if len(ids) >= 2**31 else np.int32)
        table[ids.astype(np.int64, copy=False) - low] = np.arange(len(ids), dtype=table.dtype)
        return cls(sorted_ids, order, low, table)

    def find(self, query: Any) -> tuple[np.ndarray, np.ndarray]:
        """(internal indices (int64), found) of the raw ids ``query``; an index where not found
        is meaningless. An id of another type than the known ones (an int where they are
        strings) is not found. A query of Python objects (a pandas column of strings, nullable
        integers) is searched as strings or integers when it holds only those, else one id at a
        time through a hash table (mixed types, missing values)."""
        query = np.asarray(query).reshape(-1)
        if not len(self.sorted_ids) or not len(query):
            return np.zeros(len(query), np.int64), np.zeros(len(query), bool)
        if query.dtype.kind == "O":
            import pandas as pd  # here only: serving an artifact needs no pandas otherwise

            inferred = pd.api.types.infer_dtype(query, skipna=False)
            if inferred == "string":
                query = query.astype(str)
            elif inferred == "integer":
                query = query.astype(np.int64)
            else:
                at = pd.Index(self.sorted_ids).get_indexer(pd.Index(query, dtype=object))
                return self._internal(np.maximum(at, 0)), at >= 0
        if self.table is not None and query.dtype.kind in "iu":
            # int64 offsets wrap only where the query is no id; uint64 past int64 is no id
            offset = query.astype(np.int64) - self.low
            inside = (offset >= 0) & (offset < len(self.table))
            if query.dtype.kind == "u":
                inside &= query <= np.iinfo(np.int64).max
            index = self.table[np.where(inside, offset, 0)].astype(np.int64)
            found = inside & (index >= 0)
            return np.where(found, index, 0), found
        pos = np.searchsorted(self.sorted_ids, query).clip(max=len(self.sorted_ids) - 1)
        found = np.asarray(self.sorted_ids[pos] == query, dtype=bool)
        return self._internal(pos), np.broadcast_to(found, query.shape)

    def _internal(self, pos: np.ndarray) -> np.ndarray:
        return (pos if self.order is None else self.order[pos]).astype(np.int64)


@dataclass(frozen=True, eq=False)
class SeenItems:
    """Items to leave out of one recommender's recommendations, per user (a user's history):
    built once by :meth:`CompressedRecommender.seen_items` from raw (user, item) pairs, then
    passed to every :meth:`~CompressedRecommender.recommend` call as ``exclude``.

    ``indptr`` / ``items``: each known user's items as internal indices, in CSR (user ``u``'s
    are ``items[indptr[u]:indptr[u + 1]]``). ``dropped``: the pairs left out because the
    recommender knows their user or item under no such raw id (a user or item that came after
    training cannot be recommended to or recommended anyway)."""

    indptr: np.ndarray
    items: np.ndarray
    dropped: int
    user_ids: np.ndarray  # the raw ids of the recommender it was built for
    item_ids: np.ndarray

    def __len__(self) -> int:
        return len(self.items)


class CompressedRecommender:
    """An inference model rebuilt from an artifact; speaks the dataset's raw ids."""

    def __init__(self, model: Recommender, user_ids: np.ndarray, item_ids: np.ndarray) -> None:
        self.model = model.eval()
        self.user_ids, self.item_ids = user_ids, item_ids
        self._users = _IdLookup.of(user_ids)
        self._items: _IdLookup | None = None  # built when needed

    def user_index(self, user_ids: list | np.ndarray) -> np.ndarray:
        """Internal indices (int64) of raw user ids; unknown ids raise :class:`DataError`."""
        query = np.asarray(user_ids).reshape(-1)
        index, found = self._users.find(query)
        if not found.all():
            missing = query[~found][:5].tolist()
            raise DataError(
                f"unknown user ids {missing}: the artifact knows {len(self.user_ids)} users."
            )
        return index

    def seen_items(self, user_ids: Any, item_ids: Any) -> SeenItems:
        """The items each user has seen, from raw (user, item) pairs (``user_ids[j]`` saw
        ``item_ids[j]``: e.g. the two id columns of the interaction log the model was trained
        on), to pass as ``recommend(..., exclude=...)``. Build it once: 10M pairs at 1M users
        took 1.2 s here with integer ids of a short span (a dense table), 2.4 s with ids
        searched (a longer span, strings). Repeated pairs count once. Pairs with a user or
        item id the recommender does not know are left out and counted in ``dropped``; if none
        is known, or the two sequences differ in length, :class:`DataError` says so (the ids
        are compared as they are: an int is not the string of its digits)."""
        users, items = np.asarray(user_ids).reshape(-1), np.asarray(item_ids).reshape(-1)
        if len(users) != len(items):
            raise DataError(
                f"seen_items got {len(users)} user ids and {len(items)} item ids: pass one user "
                "and one item id per interaction (two columns of the same log)."
            )
        if self._items is None:
            self._items = _IdLookup.of(self.item_ids)
        user_index, user_found = self._users.find(users)
        item_index, item_found = self._items.find(items)
        known = user_found & item_found
        if len(users) and not known.any():
            raise DataError(
                f"none of the {len(users)} (user, item) pairs names a user and an item this "
                f"artifact knows (its user ids look like {self.user_ids[:3].tolist()}, its item "
                f"ids like {self.item_ids[:3].tolist()}; got {users[:3].tolist()} and "
                f"{items[:3].tolist()}): pass the raw ids of the dataset it was trained on, "
                "users first."
            )
        indptr, seen = csr(user_index[known], item_index[known], len(self.user_ids), unique=True)
        return SeenItems(indptr, seen, int((~known).sum()), self.user_ids, self.item_ids)

    def _check_seen(self, exclude: SeenItems) -> None:
        ours = exclude.user_ids is self.user_ids and exclude.item_ids is self.item_ids
        if not ours and not (
            np.array_equal(exclude.user_ids, self.user_ids)
            and np.array_equal(exclude.item_ids, self.item_ids)
        ):
            raise DataError(
                "exclude was built by another recommender's seen_items (other user or item "
                "ids): build it with this one's, recommender.seen_items(user_ids, item_ids)."
            )

    @overload
    def recommend(
        self,
        user_ids: list | np.ndarray,
        k: int = ...,
        exclude: SeenItems | None = ...,
        *,
        return_scores: Literal[False] = ...,
    ) -> np.ndarray: ...

    @overload
    def recommend(
        self,
        user_ids: list | np.ndarray,
        k: int = ...,
        exclude: SeenItems | None = ...,
        *,
        return_scores: Literal[True],
    ) -> tuple[np.ndarray, np.ndarray]: ...

    @overload
    def recommend(
        self,
        user_ids: list | np.ndarray,
        k: int = ...,
        exclude: SeenItems | None = ...,
        *,
        return_scores: bool,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]: ...

    @torch.no_grad()
    def recommend(
        self,
        user_ids: list | np.ndarray,
        k: int = 10,
        exclude: SeenItems | None = None,
        *,
        return_scores: bool = False,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """``[len(user_ids), k]`` raw item ids, best first, for raw user ids.

        ``exclude`` (from :meth:`seen_items`): leave out each user's seen items. A user with
        fewer than ``k`` unseen items gets all of them first, then seen ones in no given order,
        whose scores are ``-inf``.

        ``return_scores``: also return the model's scores of those items (the same shape,
        float32, float64 for a float64 model; ``-inf`` where ``exclude`` left an item out),
        e.g. to blend with another model or to drop the seen items that fill a short row. Raw
        scores: logits for a model trained with ``bce``, predicted ratings for ``mse``,
        unnormalised preferences for ``bpr`` (only their order means anything).

        Users are scored in chunks (:func:`recommend_chunk_rows`), each chunk's scores written
        into one buffer that the call reuses, so that memory stays bounded whatever the number
        of users, and a chunk's scores are still in cache when top-k reads them. A compressed
        item table is expanded once a call (:func:`~recsys_compress.models.base.tables_read_once`).
        """
        users = torch.from_numpy(self.user_index(user_ids))
        if exclude is not None:
            self._check_seen(exclude)
        model = self.model
        k = min(k, model.num_items)
        rows = recommend_chunk_rows(model.num_items)
        top = torch.empty(len(users), k, dtype=torch.long)
        floats = (p.dtype for p in model.parameters() if p.is_floating_point())
        dtype = next(floats, torch.get_default_dtype())  # the scores' dtype: a bf16 model's
        top_scores = None
        if return_scores:  # float32 (bf16 and float16 fit exactly), float64 kept
            wide = torch.float64 if dtype == torch.float64 else torch.float32
            top_scores = torch.empty(len(users), k, dtype=wide)
        buffer = None
        if takes_out(model) and len(users):
            buffer = torch.empty(min(rows, len(users)) * model.num_items, dtype=dtype)
        with tables_read_once():  # a quantised or factorised table built once, not per chunk
            for start in range(0, len(users), rows):
                chunk = users[start : start + rows]
                scores = (
                    model.score_all(chunk) if buffer is None else model.score_all(chunk, out=buffer)
                )
                if exclude is not None:
                    if buffer is None or scores.data_ptr() != buffer.data_ptr():
                        scores = scores.clone()  # not ours to write: it may view the model
                    seen = rows_of_users(exclude.indptr, exclude.items, chunk.numpy())
                    scores[torch.from_numpy(seen[0]), torch.from_numpy(seen[1])] = float("-inf")
                best = torch.topk(scores, k, dim=1)
                top[start : start + len(chunk)] = best.indices
                if top_scores is not None:
                    if best.values.dtype == torch.float64 and top_scores.dtype != torch.float64:
                        top_scores = top_scores.double()  # a custom model's float64 scores
                    top_scores[start : start + len(chunk)] = best.values
        items = self.item_ids[top.numpy()]
        if top_scores is None:
            return items
        return items, top_scores.numpy()


# Scores computed at a time by CompressedRecommender.recommend, and the fewest users a chunk
# holds: the item table is read once per chunk, so a chunk of few users at a large catalogue
# pays that read for little work. recommend(1,000 users, k=10), MF-64, one thread (timing loop,
# medians of 7): 3,706 items 16.5-18.7 ms in one score matrix against 12.8-13.6 ms in chunks
# of 282 users (2^20 scores, 4 MB: top-k reads them from cache); 100k items 446 ms (a fresh
# 400 MB matrix page-faulted on every call: 98k faults) against 353 ms in chunks of 64 users
# (26 MB); 1M items, two threads, 4.5 s (4 GB) against 2.5 s (chunks of 64: 256 MB) where 16
# users a chunk took 4.4 s and 128 took 2.9 s.
RECOMMEND_CHUNK_ELEMENTS = 1 << 20
RECOMMEND_MIN_ROWS = 64


def recommend_chunk_rows(num_items: int) -> int:
    """Users scored at a time by :meth:`CompressedRecommender.recommend`: as many as
    :data:`RECOMMEND_CHUNK_ELEMENTS` scores hold, and at least :data:`RECOMMEND_MIN_ROWS`
    (a chunk's score matrix is then at most the size of a 64-dim item table)."""
    return max(RECOMMEND_MIN_ROWS, RECOMMEND_CHUNK_ELEMENTS // max(1, num_items))


_INIT_FUNCTIONS = frozenset(
    getattr(nn.init, name) for name in dir(nn.init) if name.endswith("_") and name[0] != "_"
)


class _SkipInit(TorchFunctionMode):
    """``torch.nn.init`` functions do nothing inside: a model that is about to receive saved
    values is built without drawing random ones (on the meta device, each call costs ~2 ms)."""

    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        if func in _INIT_FUNCTIONS:
            return args[0] if args else (kwargs or {})["tensor"]
        return func(*args, **(kwargs or {}))


def _empty_model(model_cfg: ModelConfig, num_users: int, num_items: int) -> nn.Module:
    """The model of ``model_cfg`` on the meta device, without random init: one about to
    receive saved tensors (``load_state_dict(..., assign=True)``)."""
    with _SkipInit(), torch.device("meta"):
        return build_model(_plain(model_cfg), num_users, num_items)


# safetensors' dtype names (the format's spec) of the tensors an artifact may hold
_SAFETENSORS_DTYPES = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} in the header: not a number of bytes or elements")


def read_safetensors(
    path: Path,
) -> tuple[torch.Tensor, dict[str, str], dict[str, torch.Tensor]]:
    """A safetensors file's bytes, metadata and tensors: the file read once into one uint8
    tensor (returned first, for :func:`_off_the_file`), every tensor a view of it (no copy per
    tensor, no memory map left behind).

    Against ``safe_open`` (a memory map; ``get_tensor`` views it) and a copy of each tensor into
    memory of its own, this is one read into fresh memory where that was one copy: 0.12 against
    0.45 ms for an ML-1M-sized artifact, where per-tensor costs decide. At 75 MB the first touch
    of the fresh pages decides (~2.3 us a 4 KB page here): a whole load took ~100 ms against
    ~85 ms through the memory map, whose pages the page cache held. The buffer is
    ``torch.empty``: a ``bytearray`` is zero-filled first (80 against 45 ms to read 75 MB).

    The layout is the format's: an 8-byte little-endian header length, the JSON header (each
    tensor's ``dtype``, ``shape`` and ``data_offsets`` into the bytes after the header, and an
    optional ``__metadata__`` of strings), then the tensors' bytes. A header that does not fit
    the file, or a tensor whose bytes do not fit its dtype and shape, raises ``ValueError``
    naming it, as do tensors whose bytes overlap or leave gaps (safetensors' own check); an
    unknown dtype raises ``KeyError``."""
    with path.open("rb") as handle:
        file_size = os.fstat(handle.fileno()).st_size
        first = handle.read(8)
        if len(first) < 8:
            raise ValueError(f"{len(first)} bytes: shorter than a safetensors header")
        (size,) = struct.unpack("<Q", first)
        start = 8 + size
        if start > file_size:  # checked before anything as large as the file is read
            raise ValueError(f"a header of {size} bytes in a file of {file_size}")
        header = json.loads(handle.read(size), parse_constant=_no_constant)
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        data = torch.empty(file_size, dtype=torch.uint8)
        handle.seek(0)
        if handle.readinto(data.numpy()) != file_size:
            raise ValueError("the file changed size while it was read")
    metadata = header.pop("__metadata__", None) or {}
    tensors, spans = {}, []
    for name, entry in header.items():
        dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
        shape, offsets = list(entry["shape"]), list(entry["data_offsets"])
        if not all(type(n) is int for n in (*shape, *offsets)) or len(offsets) != 2:
            raise ValueError(f"tensor {name}: shape and data_offsets must be lists of integers")
        begin, end = offsets
        count = math.prod(shape)
        fits = begin >= 0 and min(shape, default=0) >= 0 and start + end <= file_size
        if not fits or end - begin != count * dtype.itemsize:
            raise ValueError(
                f"tensor {name}: bytes {begin} to {end} after the header do not hold a "
                f"{entry['dtype']} tensor of shape {shape} within the file"
            )
        spans.append((begin, end))
        view = data[start + begin : start + end]
        if (start + begin) % dtype.itemsize:  # safetensors aligns them; a copy if not
            view = view.clone()
        tensors[name] = view.view(dtype).view(shape)
    covered = 0
    for begin, end in sorted(spans):
        if begin != covered:
            break
        covered = end
    if start + covered != file_size:
        raise ValueError("the tensors' bytes overlap or leave gaps between the header and the end")
    return data, metadata, tensors


def _off_the_file(data: torch.Tensor, kept: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``kept`` with its views of ``data`` (a file read by :func:`read_safetensors`) copied when
    they are under half of it: a view keeps the whole buffer alive, and where the rest was decoded
    into new tensors (int4 nibbles, bitmasks and their values, float16-stored scales) that is
    mostly bytes nothing reads. Views that are most of the file (the dense int8 or float tables
    of an int8 or SVD artifact) stay views: no second copy of the model."""
    buffer = data.untyped_storage().data_ptr()
    views = [k for k, t in kept.items() if t.untyped_storage().data_ptr() == buffer]
    if 2 * sum(kept[k].nbytes for k in views) >= data.nbytes:
        return kept
    return {**kept, **{k: kept[k].clone() for k in views}}


def load_compressed(path: str | Path) -> CompressedRecommender:
    """Rebuild the model stored in an artifact written by :func:`export_model`.

    A truncated or damaged file raises :class:`DataError` naming it: the checksum of its
    metadata and tensors written by :func:`export_model` must be there and match (CRC-32; a
    SHA-256, where present, in artifacts of format version 1: :data:`FORMAT_SUMS`).
    """
    path = Path(path)
    try:
        data, metadata, tensors = read_safetensors(path)
        text = metadata["recsys_compress"]
        meta = unpack_metadata(text)
        if meta.get("format") not in FORMAT_SUMS:
            raise KeyError("format")
        sums = {a: tensors.pop(f"::{a}") for a in CHECKSUMS if f"::{a}" in tensors}
        allowed = FORMAT_SUMS[meta["format"]]
        if len(sums) > 1 or next(iter(sums), None) not in allowed:
            raise DataError(
                f"{path}: a {meta['format']} artifact holds the checksum entries "
                f"{sorted(sums) or 'none'}, not one of {[a for a in allowed if a]}: the file was "
                "damaged or modified after it was written. Export it again with "
                "`python -m recsys_compress.export <run dir>`."
            )
        for algorithm, stored in sums.items():
            if not torch.equal(payload_checksum(tensors, text, algorithm), stored):
                raise DataError(
                    f"{path}: its contents do not match the checksum ({algorithm}) stored in it "
                    "at export: the file was modified or damaged after it was written. Export "
                    "it again with `python -m recsys_compress.export <run dir>`."
                )
        state = {name: decode_tensor(name, tensors, info) for name, info in meta["tensors"].items()}
        ids = {key: tensors[key] for key in ("::user_ids", "::item_ids") if key in tensors}
        state = _off_the_file(data, {**state, **ids})
        ids = {key: state.pop(key) for key in ids}
        model = _empty_model(ModelConfig(**meta["model"]), meta["num_users"], meta["num_items"])
        with _SkipInit():  # modules rebuilt by the load draw no random weights either
            load_compressed_state(model, state, meta["structure"], assign=True)
    except DataError:
        raise
    except (
        zlib.error,
        OSError,
        KeyError,
        ValueError,
        RuntimeError,
        TypeError,
        AttributeError,
        IndexError,
    ) as err:
        raise DataError(
            f"{path} is not a readable recsys-compress artifact ({type(err).__name__}: {err}); "
            "it may be truncated or modified: export it again with "
            "`python -m recsys_compress.export <run dir>`."
        ) from None
    user_ids = _ids_from(meta["user_ids"], ids.get("::user_ids"))
    item_ids = _ids_from(meta["item_ids"], ids.get("::item_ids"))
    return CompressedRecommender(model, user_ids, item_ids)


def load_run_state(
    model: nn.Module, path: Path, structure: dict[str, Any], assign: bool = False
) -> None:
    """Load a run's ``model.pt`` (``weights_only``) into ``model`` built from its config.

    A missing or unreadable file, or one whose tensors do not fit the config's model (another
    run's, or the data changed), raises :class:`DataError` naming the file and what differs.
    ``assign``: as :func:`load_compressed_state`'s (``model`` may be on the meta device).
    """
    if not path.is_file():
        raise DataError(f"{path} not found: the run kept no model (save_model=false).")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as err:
        raise DataError(
            f"{path} cannot be read as a model.pt ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); it is truncated or not a state "
            "dict saved by this package: train the run again."
        ) from None
    if not isinstance(state, dict):
        raise DataError(f"{path} holds a {type(state).__name__}, not a state dict.")
    expected = model.state_dict()
    if not structure.get("lowrank"):  # else factorised / reduced shapes are expected
        for name, tensor in state.items():
            if name in expected and tuple(tensor.shape) != tuple(expected[name].shape):
                raise DataError(
                    f"{path} does not fit the model of its run's config: {name} has shape "
                    f"{tuple(tensor.shape)}, the config's {type(model).__name__} "
                    f"{tuple(expected[name].shape)}. The model.pt belongs to another run, or the "
                    "data or model.* keys changed since training."
                )
    try:
        load_compressed_state(model, state, structure, assign=assign)
    except (RuntimeError, KeyError, AttributeError) as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        detail = "; ".join(lines[1:3] or lines[:1])
        raise DataError(
            f"{path} does not fit the model of its run's config ({detail}). The model.pt belongs "
            "to another run, or the data or model.* keys changed since training."
        ) from None


def load_run_model(
    path: Path, model_cfg: ModelConfig, num_users: int, num_items: int, structure: dict[str, Any]
) -> nn.Module:
    """A run's ``model.pt`` as the model of its config, built without storage or random init
    (the saved tensors become its parameters, as :func:`load_compressed` does for an
    artifact): 3.3 ms for an ML-1M-sized MF-64 against 8.1 ms to build it with random weights
    and copy the state in (``python scripts/bench.py``, 2026-12-07). Errors as
    :func:`load_run_state`'s."""
    model = _empty_model(model_cfg, num_users, num_items)
    with _SkipInit():  # modules rebuilt by the load draw no random weights either
        load_run_state(model, path, structure, assign=True)
    return model


def export_run(run_dir: Path, out: Path | None = None) -> Path:
    """Export the final model of a finished run (its ``model.pt``) next to its results."""
    from recsys_compress.data.interactions import load_interactions

    results_path = run_dir / RESULTS_FILE
    if not results_path.is_file():
        raise DataError(f"{results_path} not found: pass the directory of a finished run.")
    record = read_record(run_dir)
    if record is None:
        raise DataError(f"{results_path} is unreadable (truncated?): nothing to export.")
    if record.get("status") != "completed":
        raise DataError(
            f"{run_dir} did not complete (status {record.get('status')}): nothing to export."
        )
    cfg = to_train_config(record["config"])
    interactions = load_interactions(cfg.data)
    structure = record.get("compression", {}).get("structure", {})
    model = load_run_model(
        run_dir / "model.pt", cfg.model, interactions.num_users, interactions.num_items, structure
    )
    out = out or run_dir / ARTIFACT_NAME
    export_model(model, cfg.model, interactions.user_ids, interactions.item_ids, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a run's compressed safetensors artifact.")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        path = export_run(args.run_dir, args.out)
    except RecsysCompressError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{path} ({path.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
