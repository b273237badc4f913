"""Pages to bytes and back, with a CRC-32 per page (~0.17 ms per MB here): a page whose bytes,
size or checksum are wrong is never handed to a model, it ends the run of usable pages."""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
import torch

from kv_store.identity import ModelIdentity
from kv_store.messages import PageLocation


def pack_pages(pages: Sequence[torch.Tensor]) -> tuple[np.ndarray, tuple[int, ...]]:
    """Tensors of pages [n_i, *page_shape] (any device) -> one uint8 buffer of all pages in order,
    and each page's checksum."""
    rows = torch.cat(
        [p.detach().to("cpu").contiguous().view(torch.uint8).reshape(p.shape[0], -1) for p in pages]
    )
    array = rows.numpy()
    return array.reshape(-1), tuple(zlib.crc32(row) for row in array)


def unpack_pages(
    locations: Sequence[PageLocation], buffers: dict[object, np.ndarray], identity: ModelIdentity
) -> torch.Tensor:
    """The leading pages whose bytes check out, as a new tensor [n, *page_shape]; `buffers` maps
    each location's object ref to its object's bytes."""
    out = torch.empty((len(locations), *identity.page_shape), dtype=identity.dtype)
    rows = out.view(torch.uint8).reshape(len(locations), identity.page_nbytes).numpy()
    good = 0
    for location in locations:
        data = buffers[location.object_ref]
        if not (
            isinstance(data, np.ndarray)
            and data.dtype == np.uint8
            and data.ndim == 1
            and location.nbytes == identity.page_nbytes
            and location.offset + location.nbytes <= data.size
        ):
            break
        page = data[location.offset : location.offset + location.nbytes]
        if zlib.crc32(page) != location.checksum:
            break
        rows[good] = page
        good += 1
    return out[:good]
