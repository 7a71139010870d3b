"""What the planner is asked about: the cluster (devices and nodes) and the workload (mean
prompt and output lengths, given or read from a JSONL input file). Bad values raise PlanError
naming the setting.

ClusterSpec and WorkloadSpec are the `cluster.*` and `workload.*` keys of the launch config
(the schema takes its defaults from them; the launch itself ignores them, its dry run and
`python -m ds3dist.plan` read them)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ds3dist.plan.accelerators import FIGURES, KINDS, Accelerator, accelerator

# Workload defaults when neither lengths nor an input file are given: the prompt mean here,
# the output from the config's sampling.max_new_tokens.
DEFAULT_PROMPT_TOKENS = 1000
TOKENS_PER_CHAR = 0.3  # a JSONL input's prompts: characters -> tokens (English text, roughly)


class PlanError(ValueError):
    """A cluster or workload setting is impossible; the message starts with the setting."""


@dataclass(frozen=True)
class Cluster:
    device: Accelerator
    gpus_per_node: int
    nodes: int

    @property
    def devices(self) -> int:
        return self.gpus_per_node * self.nodes

    @property
    def kind(self) -> str:
        """The runner's parallel.device for it."""
        return "cpu" if self.device.name == "cpu" else "cuda"

    @classmethod
    def of(cls, gpu: str, gpus_per_node: int, nodes: int,
           figures: dict[str, float] | None = None) -> "Cluster":
        """The cluster.* keys checked (PlanError naming the first at fault); `cpu`: this
        machine measured, one rank's share of it with gpus_per_node ranks a node."""
        if gpu not in KINDS:
            raise PlanError(f"cluster.gpu: unknown accelerator {gpu!r}; choose one of "
                            f"{sorted(KINDS)}")
        for key, v in (("cluster.gpus_per_node", gpus_per_node), ("cluster.nodes", nodes)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise PlanError(f"{key}: must be an integer >= 1, got {v!r}")
        for key, v in (figures or {}).items():
            if key not in FIGURES:
                raise PlanError(f"cluster.figures.{key}: not a figure; choose from "
                                f"{list(FIGURES)}")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (
                    v > 0 or (key == "fp8_tflops" and v == 0)) or math.isinf(v):
                raise PlanError(f"cluster.figures.{key}: must be a number > 0, got {v!r}")
        device = accelerator(gpu, gpus_per_node).with_figures(**(figures or {}))
        return cls(device, gpus_per_node, nodes)

    def describe(self) -> str:
        d = self.device
        what = " (this machine measured, a rank's share)" if d.name == "cpu" else ""
        return (f"{self.nodes} node(s) x {self.gpus_per_node} {d.name}{what}: "
                f"{d.memory_gb:.4g} GB, {d.hbm_tbps:.3g} TB/s, {d.bf16_tflops:.3g}/"
                f"{d.fp8_tflops:.4g} TFLOPS bf16/fp8, links {d.intra_gbps:g} GB/s in a node, "
                f"{d.inter_gbps:g} GB/s between nodes")


@dataclass(frozen=True)
class ClusterSpec:
    """The cluster.* keys: the accelerator kind (a row of the table, or `cpu`: this machine
    measured), devices per node, nodes, and overrides of the kind's figures."""
    gpu: str = "h100"
    gpus_per_node: int = 8
    nodes: int = 1
    figures: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, node: Any) -> "ClusterSpec":
        """From the composed config's `cluster` section (or a mapping like it)."""
        get = (lambda k: node[k]) if isinstance(node, dict) else (lambda k: getattr(node, k))
        return cls(str(get("gpu")), get("gpus_per_node"), get("nodes"),
                   {str(k): v for k, v in (get("figures") or {}).items()})

    def cluster(self) -> Cluster:
        return Cluster.of(self.gpu, self.gpus_per_node, self.nodes, self.figures)


@dataclass(frozen=True)
class WorkloadSpec:
    """The workload.* keys: mean prompt and output lengths, or a JSONL input to read them from
    (null: the job's input, else DEFAULT_PROMPT_TOKENS and sampling.max_new_tokens)."""
    prompt_tokens: float | None = None
    output_tokens: float | None = None
    input: str | None = None

    @classmethod
    def of(cls, node: Any) -> "WorkloadSpec":
        get = (lambda k: node[k]) if isinstance(node, dict) else (lambda k: getattr(node, k))
        return cls(get("prompt_tokens"), get("output_tokens"),
                   None if get("input") is None else str(get("input")))

    def workload(self, default_output: int, job_input: str | None = None) -> "Workload":
        """The lengths given; else read from the input (workload.input, else job_input): its
        prompts' mean (characters x TOKENS_PER_CHAR) and its lines' output limits; else the
        defaults. A given output length wins over the file's."""
        path = self.input if self.input is not None else job_input
        for key, v in (("workload.prompt_tokens", self.prompt_tokens),
                       ("workload.output_tokens", self.output_tokens)):
            if v is not None and not v >= 0:
                raise PlanError(f"{key}: must be a number >= 0, got {v:g}")
        if path is not None and self.prompt_tokens is None:
            w = Workload.from_jsonl(path, TOKENS_PER_CHAR, default_output)
            if self.output_tokens is not None:
                w = Workload(w.prompt_tokens, self.output_tokens, w.source)
            return w
        output = self.output_tokens if self.output_tokens is not None else default_output
        given = self.prompt_tokens is not None
        return Workload(self.prompt_tokens if given else DEFAULT_PROMPT_TOKENS, output,
                        "given" if given else "default")


@dataclass(frozen=True)
class Workload:
    """Mean tokens per request: prompt and output (completion)."""
    prompt_tokens: float
    output_tokens: float
    source: str = "given"

    def __post_init__(self) -> None:
        for key, v in (("workload.prompt_tokens", self.prompt_tokens),
                       ("workload.output_tokens", self.output_tokens)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise PlanError(f"{key}: must be a number >= 0, got {v!r}")
        if self.output_tokens == 0:
            raise PlanError("workload.output_tokens: must be > 0 (completion tokens/s ranks "
                            "the layouts)")

    @classmethod
    def from_jsonl(cls, path: str | Path, tokens_per_char: float, default_output: int
                   ) -> "Workload":
        """Mean lengths of a JSONL input (native or OpenAI batch lines): prompt characters x
        tokens_per_char (no tokenizer needed), the line's max_new_tokens / max_tokens else
        default_output. Lines that are not requests are skipped."""
        prompts, outputs = [], []
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise PlanError(f"workload.input: cannot read {path}: {e}") from None
        for line in text.split("\n"):
            try:
                raw = json.loads(line)
            except ValueError:
                continue
            if not isinstance(raw, dict):
                continue
            body = raw.get("body") if isinstance(raw.get("body"), dict) else raw
            prompt = body.get("prompt")
            if prompt is None and isinstance(body.get("messages"), list):
                prompt = " ".join(str(m.get("content", "")) for m in body["messages"]
                                  if isinstance(m, dict))
            if not isinstance(prompt, str):
                continue
            out = next((body[k] for k in ("max_new_tokens", "max_tokens",
                                          "max_completion_tokens")
                        if isinstance(body.get(k), int)), default_output)
            prompts.append(len(prompt) * tokens_per_char)
            outputs.append(out)
        if not prompts:
            raise PlanError(f"workload.input: {path} holds no requests")
        return cls(sum(prompts) / len(prompts), sum(outputs) / len(outputs), str(path))
