"""Run a plan: read, transform and write one tensor group at a time, into a temporary sibling
directory that is renamed into place only when everything, metadata included, is written."""

from __future__ import annotations

from collections import Counter

import torch
from tqdm import tqdm

from .hub import HubTensors
from .io.hashed_file import file_hashing
from .ops import Identity
from .plan import Plan, check_float16
from .provenance import MANIFEST, HashingWriter, write_manifest
from .staging import staged


# a tensor that only changes name (and maybe dtype) is copied in pieces of this size, so
# even a 1 GB embedding never sits whole in memory when reader and writer allow it
CHUNK_BYTES = 64 * 2**20


def execute(plan: Plan, *, force: bool = False, delete_existing: bool = False, allow_overflow: bool = False,
            allow_nan: bool = False, progress: bool = True, manifest: bool = True) -> list[str]:
    """Writes the plan's output; returns the non-tensor files written. What interrupted runs to
    the same output left behind is cleaned first, and said in plan.notes. Without `manifest`, no
    byte is hashed and no weightport-manifest.json is written."""
    with staged(plan.out_dir, force, delete_existing) as (tmp, cleaned), file_hashing(manifest):
        writer = plan.target.writer(tmp, plan.files)
        writer = HashingWriter(writer) if manifest else writer
        try:
            _stream(plan, writer, (allow_overflow, allow_nan), progress)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        model, dtype = plan.source.model, _output_dtype(plan)
        side = plan.target.write_index(tmp, plan.files, model, dtype, plan.options)
        side += plan.target.write_metadata(tmp, plan.source, model, dtype, plan.options)
        if manifest:
            write_manifest(tmp, plan, writer.hashes)
            side.append(MANIFEST)
    plan.notes += cleaned  # about this run, not the output: after the manifest, which is the same every run
    return side


def _output_dtype(plan: Plan) -> torch.dtype:
    if plan.dtype is not None:
        return plan.dtype
    counts = Counter()
    for t in plan.outputs:
        if t.dtype.is_floating_point:
            counts[t.dtype] += t.nbytes
    return counts.most_common(1)[0][0] if counts else torch.float32


def _stream(plan: Plan, writer, allow: tuple[bool, bool], progress: bool) -> None:
    source = plan.source.source
    hub = HubTensors(source, plan.read_steps, Counter(h for step in plan.write_steps for h in step.inputs))
    planned = {t.name: t for t in plan.outputs}

    bar = tqdm(total=plan.total_bytes, unit="B", unit_scale=True, desc="converting",
               disable=not progress, leave=False, dynamic_ncols=True)
    try:
        for step in plan.write_steps:
            if _stream_rename(step, hub, writer, planned, allow):
                bar.update(planned[step.outputs[0]].nbytes)
                continue
            outs = step.run([hub.take(h) for h in step.inputs])
            cast = []
            for name, t in zip(step.outputs, outs):
                want = planned[name].dtype
                if t.dtype != want:
                    if want == torch.float16:
                        check_float16(name, t, *allow)
                    t = t.to(want)
                cast.append(t)
            # keep a tied pair one object after casting, so writers can store it once
            if len(cast) == 2 and outs[0] is outs[1]:
                cast[1] = cast[0]
            writer.write_group(list(step.outputs), cast)
            bar.update(sum(planned[n].nbytes for n in step.outputs if not planned[n].alias))
            # drop this group before reading the next: peak memory is one group, not two
            del outs, cast, t
    finally:
        bar.close()


def _stream_rename(step, hub: HubTensors, writer, planned, allow: tuple[bool, bool]) -> bool:
    """Move a renamed-only tensor without holding a copy of it: in pieces when the writer takes
    pieces, else straight from the source file's pages. False when this step needs the tensor."""
    if not (isinstance(step.op, Identity) and len(step.inputs) == 1):
        return False
    source = hub.source
    name = hub.renamed_from(step.inputs[0])
    out = planned[step.outputs[0]]
    if name is None or out.nbytes <= CHUNK_BYTES:
        return False
    if hasattr(writer, "write_chunks"):
        chunks = source.iter_chunks(name, CHUNK_BYTES)
        if chunks is None:
            return False

        def cast(pieces):
            for piece in pieces:
                if piece.dtype != out.dtype:
                    if out.dtype == torch.float16:
                        check_float16(out.name, piece, *allow)
                    piece = piece.to(out.dtype)
                yield piece

        writer.write_chunks(out.name, out.shape, out.dtype, cast(chunks))
    else:
        if source.tensors[name].dtype != out.dtype:
            return False
        view = source.mapped(name)
        if view is None:
            return False
        writer.write_group([out.name], [view])
        del view
        source.release(name)
    hub.skip(step.inputs[0])
    return True
