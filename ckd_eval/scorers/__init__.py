"""One scorer per benchmark, each mirroring an official script (its module docstring says which and
lists the quirks). Every scorer is ``score(answers, annotations, questions=None, out_dir=None,
allow_partial=False) -> {"metric", "score", "n", "details", ["files"]}``.

:data:`BENCHMARKS` also records each benchmark's LLaVA-1.5 data layout under ``--data-root``.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

from ckd_eval.common import MULTI_CHOICE_SUFFIX, SHORT_ANSWER_SUFFIX
from ckd_eval.scorers import gqa, mme, mmmu, pope, sqa, synth, textvqa, vqav2


@dataclass(frozen=True)
class Benchmark:
    name: str
    scorer: ModuleType
    questions: str           # question file, relative to --data-root
    images: str              # image folder, relative to --data-root
    annotations: str         # default annotations, relative to --data-root
    max_new_tokens: int = 128
    suffix: str | None = None        # appended to the question when it is not already there
    image_in_prompt: bool = False    # answer 'prompt' starts with "<image>\n" (ScienceQA's convention)
    needs_questions: bool = False    # the scorer needs the question file too

    @property
    def scorer_version(self) -> str:
        return self.scorer.VERSION

    @property
    def official(self) -> str:
        return self.scorer.OFFICIAL

    @property
    def source(self) -> str:
        """Where the inputs come from, in the version the official numbers use (README, errors)."""
        return self.scorer.SOURCE


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    Benchmark("vqav2", vqav2, "vqav2/llava_vqav2_mscoco_test-dev2015.jsonl", "vqav2/test2015",
              "vqav2/llava_vqav2_mscoco_test2015.jsonl", suffix=SHORT_ANSWER_SUFFIX),
    Benchmark("gqa", gqa, "gqa/llava_gqa_testdev_balanced.jsonl", "gqa/images",
              "gqa/testdev_balanced_questions.json", suffix=SHORT_ANSWER_SUFFIX),
    Benchmark("textvqa", textvqa, "textvqa/llava_textvqa_val_v051_ocr.jsonl", "textvqa/train_images",
              "textvqa/TextVQA_0.5.1_val.json", suffix=SHORT_ANSWER_SUFFIX),
    Benchmark("sqa", sqa, "scienceqa/llava_test_CQM-A.json", "scienceqa/images/test", "scienceqa",
              max_new_tokens=1024, suffix=MULTI_CHOICE_SUFFIX, image_in_prompt=True),
    Benchmark("mme", mme, "MME/llava_mme.jsonl", "MME/MME_Benchmark_release_version",
              "MME/MME_Benchmark_release_version", suffix=SHORT_ANSWER_SUFFIX),
    Benchmark("pope", pope, "pope/llava_pope_test.jsonl", "pope/val2014", "pope/coco",
              suffix=SHORT_ANSWER_SUFFIX, needs_questions=True),
    Benchmark("mmmu", mmmu, "MMMU/anns_for_eval.json", "MMMU/all_images", "MMMU/eval/answer_dict_val.json",
              needs_questions=True),
    Benchmark("synth", synth, "synth/eval.jsonl", "synth/images", "synth/eval.jsonl"),
)}
PAPER_BENCHMARKS = ("vqav2", "gqa", "textvqa", "sqa", "mme", "pope", "mmmu")


def get_benchmark(name: str) -> Benchmark:
    from ckd_eval.common import EvalError

    if name not in BENCHMARKS:
        raise EvalError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]
