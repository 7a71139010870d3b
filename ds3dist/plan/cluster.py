"""What the planner is asked about: the cluster (devices and nodes) and the workload (mean
prompt and output lengths, given or read from a JSONL input file). Bad values raise PlanError
naming the setting."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ds3dist.plan.accelerators import ACCELERATORS, FIGURES, Accelerator


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
        if gpu not in ACCELERATORS:
            raise PlanError(f"cluster.gpu: unknown accelerator {gpu!r}; choose one of "
                            f"{sorted(ACCELERATORS)}")
        for key, v in (("cluster.gpus_per_node", gpus_per_node), ("cluster.nodes", nodes)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise PlanError(f"{key}: must be an integer >= 1, got {v!r}")
        for key, v in (figures or {}).items():
            if key not in FIGURES:
                raise PlanError(f"cluster.{key}: not a figure; choose from {list(FIGURES)}")
            if not v > 0 and not (key == "fp8_tflops" and v == 0):
                raise PlanError(f"cluster.{key}: must be > 0, got {v!r}")
        return cls(ACCELERATORS[gpu].with_figures(**(figures or {})), gpus_per_node, nodes)

    def describe(self) -> str:
        d = self.device
        return (f"{self.nodes} node(s) x {self.gpus_per_node} {d.name}: {d.memory_gb:g} GB, "
                f"{d.hbm_tbps:g} TB/s, {d.bf16_tflops:g}/{d.fp8_tflops:g} TFLOPS bf16/fp8, "
                f"links {d.intra_gbps:g} GB/s in a node, {d.inter_gbps:g} GB/s between nodes")


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
