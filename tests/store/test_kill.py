"""SIGKILL at many points of a conversion and of a first-use auto-convert: every following run either uses a
complete, verified store of the right checkpoint or rebuilds it, never a mixed one.

Kill points are the conversion's write events (each buffered write, commit/rename, directory fsync, file
removal, manifest write). A fork server imports torch and klotski once; each kill point runs in a fresh fork
that SIGKILLs itself when the chosen event starts, so no cleanup code of the victim runs."""
import os
import random
import shutil
import subprocess
import sys

import pytest

from klotski import LLM, SamplingParams
from klotski.checkpoint import SafetensorsIndex
from klotski.store import (ExpertStore, IdentityMismatchError, StoreIncompleteError, checkpoint_identity,
                           convert_checkpoint)

SP = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
PROMPTS = [[1, 2, 3, 4], [5, 6, 7]]
DISK = dict(gpu_memory="700KiB", cpu_memory="200KiB", num_batches=2, batch_size=1)

SERVER = r"""
import os, signal, sys
import klotski.store.convert as convert
from klotski import LLM
from klotski.store import convert_checkpoint

def run(kill_at, mode, model, out):
    events = [0]
    def event(fn):
        def wrapped(*a, **k):
            events[0] += 1
            if events[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*a, **k)
        return wrapped
    convert._AtomicFile.write = event(convert._AtomicFile.write)
    convert._AtomicFile.commit = event(convert._AtomicFile.commit)
    convert.fsync_dir = event(convert.fsync_dir)
    convert.write_json_atomic = event(convert.write_json_atomic)
    os.remove = event(os.remove)
    if mode == "convert":
        convert_checkpoint(model, out, replace=True)
    else:
        llm = LLM(model, device="cpu", policy="klotski", offload_dir=out, rebuild_store=True, gpu_memory="700KiB",
                  cpu_memory="200KiB", num_batches=2, batch_size=1)
        llm.close()
    return events[0]

for line in sys.stdin:
    kill_at, mode, model, out = line.split()
    pid = os.fork()
    if pid == 0:
        n = run(int(kill_at), mode, model, out)
        sys.stdout.write(f"events {n}\n")
        sys.stdout.flush()
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    print("killed" if killed else f"exit {os.waitstatus_to_exitcode(status)}", flush=True)
"""


class ForkServer:
    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)

    def run(self, kill_at: int, mode: str, model: str, out) -> tuple[str, int | None]:
        self.proc.stdin.write(f"{kill_at} {mode} {model} {out}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline().strip()
        events = None
        if line.startswith("events"):
            events = int(line.split()[1])
            line = self.proc.stdout.readline().strip()
        assert line, "fork server died"
        return line, events

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def models(checkpoints):
    a, _ = checkpoints.get("mixtral")
    b, _ = checkpoints.get("mixtral", seed=1)
    ref = [o.token_ids for o in LLM(a, device="cpu").generate(prompt_token_ids=PROMPTS, sampling_params=SP)]
    server = ForkServer()
    yield a, b, ref, server
    server.close()


def check_after_kill(a, b, ref, out, ident_a, ident_b):
    """What a following run sees: a complete store of A or of B (verified), or no store at all; and a run of
    A (rebuilding when needed) gives A's tokens."""
    try:
        store = ExpertStore(out)
    except StoreIncompleteError:
        state = "incomplete"
    else:
        assert store.identity["fingerprint"] in (ident_a["fingerprint"], ident_b["fingerprint"])
        store.verify()  # every expert's bytes match its manifest: never a mixed store
        state = "a" if store.identity["fingerprint"] == ident_a["fingerprint"] else "b"
    try:
        llm = LLM(a, device="cpu", policy="klotski", offload_dir=str(out), **DISK)
    except IdentityMismatchError:
        assert state == "b"  # B's store survived intact: refused, never used for A
        llm = LLM(a, device="cpu", policy="klotski", offload_dir=str(out), rebuild_store=True, **DISK)
    try:
        assert [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=SP)] == ref
    finally:
        llm.close()
    assert ExpertStore(out, expect_identity=ident_a).verify() == 8
    return state


@pytest.mark.parametrize("mode,points", [("convert", 12), ("auto", 10)])
def test_sigkill_at_many_points_never_leaves_a_mixed_store(models, tmp_path, mode, points):
    a, b, ref, server = models
    ident_a, ident_b = checkpoint_identity(SafetensorsIndex(a)), checkpoint_identity(SafetensorsIndex(b))
    # a clean run counts the write events (B's store in place first, as in every killed run)
    base = tmp_path / "base"
    convert_checkpoint(b, base)
    status, total = server.run(0, mode, a, base)
    assert status == "exit 0" and total and total > points, (status, total)
    rng = random.Random(1234 + points)
    kill_points = sorted(rng.sample(range(1, total + 1), points))
    states = []
    for k in kill_points:
        out = tmp_path / f"k{k}"
        convert_checkpoint(b, out)
        status, _ = server.run(k, mode, a, out)
        assert status == "killed", (k, status)
        states.append(check_after_kill(a, b, ref, out, ident_a, ident_b))
        shutil.rmtree(out)
    assert "incomplete" in states  # the kill points reach into the conversion itself
