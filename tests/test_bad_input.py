"""Every command against bad input: exit code 2, one `error:` line naming the problem (the last line
on stderr), no traceback, and nothing written.

One table, run in-process (a subprocess per case would spend seconds importing JAX each time). The
absl commands (the trainers, core_jax.aot, dalle_jax.encode_dataset,
dalle_jax.unclip.encode_embeddings) parse process-wide flags, so each case starts from the flags
this file found and drops the ones the command defined.

More bad-input cases live beside the features they check: trainer config errors in
test_config_errors.py, CLIP's classify / embed / evaluate in test_clip_cli.py, DALL-E's generate and
fidelity eval in test_generate.py, unCLIP's generate and vary in test_unclip_generate.py and
test_unclip_vary.py, attach_decoder in test_attach_decoder.py, the dVAE tools in test_dvae_cli.py,
the launchers in test_launch.py, bad images, rows and shards in test_data_bad_input.py and
test_token_shards.py, index entries that lead out of their folder in test_index_paths.py, and the
converters' pickle checks in test_pickle_refusal.py, test_clip_convert.py and test_dvae_convert.py.
The DALL-E workdir here is a real (tiny, random) one, so the checks made after a model loads run too.
"""

from __future__ import annotations

import importlib
import json
import os
import shlex
import sys
import traceback

import numpy as np
import pytest
from absl import flags

from tests import workdirs as wd_lib
from tests.test_pickle_refusal import malicious_files
from tests.testfiles import encode_image, load_config

# name -> (module, function, how it is called): "argv" mains take the argument list; "absl"
# entry points read sys.argv through absl and the flags they define when called.
ENTRIES = {
    "clip.train": ("clip_jax.train", "main", "absl"),
    "dalle.train": ("dalle_jax.train", "main", "absl"),
    "dvae.train": ("dalle_jax.train_dvae", "main", "absl"),
    "decoder.train": ("dalle_jax.unclip.train_decoder", "main", "absl"),
    "prior.train": ("dalle_jax.unclip.train_prior", "main", "absl"),
    "upsampler.train": ("dalle_jax.unclip.train_upsampler", "main", "absl"),
    "aot": ("core_jax.aot", "cli", "absl"),
    "encode_dataset": ("dalle_jax.encode_dataset", "cli", "absl"),
    "encode_embeddings": ("dalle_jax.unclip.encode_embeddings", "cli", "absl"),
    "generate": ("dalle_jax.generate", "main", "argv"),
    "unclip.generate": ("dalle_jax.unclip.generate", "main", "argv"),
    "vary": ("dalle_jax.unclip.vary", "main", "argv"),
    "fidelity": ("dalle_jax.evaluate_fidelity", "main", "argv"),
    "reconstruct": ("dalle_jax.reconstruct", "main", "argv"),
    "convert_dvae": ("dalle_jax.convert_dvae", "main", "argv"),
    "attach_decoder": ("dalle_jax.attach_decoder", "main", "argv"),
    "evaluate": ("clip_jax.evaluate", "main", "argv"),
    "classify": ("clip_jax.classify", "main", "argv"),
    "embed": ("clip_jax.embed", "main", "argv"),
    "convert": ("clip_jax.convert", "main", "argv"),
    "tpu_pod": ("launch.tpu_pod", "main", "argv"),
    "slurm": ("launch.slurm", "main", "argv"),
}

POD = "--name t --zone z"
SLURM = "--command 'python -m clip_jax.train' --dry_run"
GEN = "--workdir {dalle} --out_dir {out} --prompt 'a red circle'"
UNCLIP = "--prior_workdir {prior} --decoder_workdir {decoder} --out_dir {out} --prompt 'a red circle'"
VARY = "--decoder_workdir {decoder} --out_dir {out}"
FID = "--out {out}/report.json"
CLASSIFY = "--workdir {clip} --input_dir {images} --classnames_file {classes} --out {out}/p.json"
EMBED = "--workdir {clip} --out {out}/e.npz"
ENC = "--dvae_workdir {dvae} --out_dir {out}"
EMB = "--clip_workdir {clip} --out_dir {out}"
FOLDER_MISSING = " --config.data.source=folder --config.data.index_file={missing}/index.csv"
WDS_MISSING = " --config.data.source=webdataset --config.data.urls={missing}/s-{{0..1}}.tar"

# (entry, arguments with {placeholders} for the fixture's paths, what the error line must contain)
CASES = [
    # --- trainers: keys, types and values of the config, and the workdir
    *[
        case
        for trainer in ("clip", "dalle", "dvae", "decoder", "prior", "upsampler")
        for case in [
            (f"{trainer}.train", "--workdir {out} --config.batchsize=8", "batchsize"),
            (f"{trainer}.train", "--workdir {out} --config.optim.lr=1", "optim.lr"),
            (f"{trainer}.train", "--workdir {out} --config.batch_size=abc", "abc"),
            (f"{trainer}.train", "--workdir {out} --config.total_steps=0", "total_steps"),
            (f"{trainer}.train", "--config.seed=1", "workdir"),
        ]
    ],
    ("clip.train", "--workdir {out} --config.batch_size=-8", "batch_size"),
    ("clip.train", "--workdir {out} --config.optim.name=adamx", "adamx"),
    ("clip.train", "--workdir {out} --config.remat=most", "remat"),
    ("clip.train", "--workdir {out} extra", "unexpected arguments: extra"),
    ("clip.train", "--workdir {out} --config.mesh.data=3", "data*fsdp*tensor"),
    ("clip.train", "--workdir {out} --config.optim.schedule=cosine2", "cosine2"),
    ("clip.train", "--workdir {out} --config.compute_dtype=float8", "float8"),
    ("clip.train", "--workdir {out} --config.init_from={missing}", "missing"),
    ("clip.train", "--workdir {out} --config.grad_accum_steps=0", "grad_accum_steps"),
    ("clip.train", "--workdir {out} --config.nan_policy=ignore", "nan_policy"),
    ("clip.train", "--workdir {out} --config={missing}/c.py", "c.py"),
    ("clip.train", "--workdir {out} --config.model.chroma_layer=3", "needs patch_embed='luma_chroma'"),
    (
        "clip.train",
        "--workdir {out} --config.model.patch_embed=luma_chroma --config.model.chroma_layer=4",
        "chroma_layer=4",
    ),
    ("dalle.train", "--workdir {out} --config.dvae_workdir={missing}", "missing"),
    ("dalle.train", "--workdir {out} --config.dvae_workdir={clip}", "does not hold a dVAE"),
    ("dalle.train", "--workdir {out} --config.dvae_workdir={empty}", "empty"),
    (
        "dalle.train",
        "--workdir {out} --config.data.source=tokens --config.data.data_dir={missing}",
        "missing",
    ),
    (
        "dalle.train",
        "--workdir {out} --config.data.source=tokens --config.data.data_dir={empty}",
        "no index.json",
    ),
    (
        "dalle.train",
        "--workdir {out} --config.data.source=tokens --config.data.data_dir={escaping_tokens} --config.text.train_source=shapes",
        "lists a shard outside",
    ),
    (
        "dvae.train",
        "--workdir {out} --config.batch_size=8 --config.data.source=folder --config.data.index_file={missing}",
        "missing",
    ),
    (
        "dvae.train",
        "--workdir {out} --config.batch_size=8 --config.data.source=webdataset --config.data.urls=",
        "urls",
    ),
    ("dvae.train", "--workdir {out} --config.batch_size=8 --config.data.image_size=-8", "image_size"),
    ("dvae.train", "--workdir {out} --config.batch_size=8 --config.data.image_size=0", "image_size must be"),
    ("dvae.train", "--workdir {out} --config.batch_size=8 --config.data.image_size=60", "not divisible"),
    ("decoder.train", "--workdir {out} --config.clip_workdir={missing}", "missing"),
    ("decoder.train", "--workdir {out} --config.clip_workdir={dvae}", "dVAE"),
    ("decoder.train", "--workdir {out} --config.clip_workdir={empty}", "empty"),
    ("prior.train", "--workdir {out} --config.clip_workdir={dalle}", "DALL-E"),
    ("prior.train", "--workdir {out} --config.clip_workdir={missing}", "missing"),
    ("upsampler.train", "--workdir {out} --config.model.low_res_size=-4", "low_res_size"),
    # --- core_jax.aot
    ("aot", "--config configs/clip_shapes.py", "topology"),
    ("aot", "--config configs/clip_shapes.py --topology v9-8", "'v9'"),
    ("aot", "--config configs/clip_shapes.py --topology v4-8 --num_slices=x", "num_slices"),
    ("aot", "--config configs/clip_shapes.py --topology v4-8 --config.batchsize=8", "batchsize"),
    ("aot", "--topology v4-8", "config"),
    # --- dalle_jax.encode_dataset
    ("encode_dataset", "--out_dir {out} --config configs/dvae_shapes.py", "--dvae_workdir"),
    ("encode_dataset", "--dvae_workdir {dvae} --config configs/dvae_shapes.py", "--out_dir"),
    ("encode_dataset", ENC + " --config configs/dvae_shapes.py --shard_size 0", "shard_size"),
    ("encode_dataset", ENC + " --config configs/dvae_shapes.py --batch_size -1", "batch_size"),
    ("encode_dataset", ENC + " --config configs/dvae_shapes.py --batch_size x", "batch_size"),
    ("encode_dataset", "--dvae_workdir {missing} --out_dir {out} --config configs/dvae_shapes.py", "missing"),
    (
        "encode_dataset",
        "--dvae_workdir {clip} --out_dir {out} --config configs/dvae_shapes.py",
        "does not hold a dVAE",
    ),
    ("encode_dataset", "--dvae_workdir {empty} --out_dir {out} --config configs/dvae_shapes.py", "empty"),
    ("encode_dataset", ENC, "--config"),
    ("encode_dataset", ENC + " --config configs/dvae_shapes.py --config.data.batchsize=1", "batchsize"),
    ("encode_dataset", ENC + " --config configs/dvae_shapes.py" + FOLDER_MISSING, "{missing}/index.csv"),
    ("encode_dataset", ENC + " --config configs/dvae_shapes.py" + WDS_MISSING, "{missing}/s-0.tar"),
    # --- dalle_jax.unclip.encode_embeddings
    ("encode_embeddings", "--out_dir {out}", "--clip_workdir"),
    ("encode_embeddings", "--clip_workdir {clip}", "--out_dir"),
    ("encode_embeddings", EMB + " --shard_size -3", "shard_size"),
    ("encode_embeddings", EMB + " --num_examples abc", "num_examples"),
    ("encode_embeddings", "--clip_workdir {dvae} --out_dir {out}", "dVAE"),
    ("encode_embeddings", "--clip_workdir {missing} --out_dir {out}", "missing"),
    ("encode_embeddings", "--clip_workdir {empty} --out_dir {out}", "empty"),
    ("encode_embeddings", EMB + " stray", "unexpected arguments: stray"),
    ("encode_embeddings", EMB + " --config configs/clip_shapes.py" + FOLDER_MISSING, "{missing}/index.csv"),
    # --- dalle_jax.generate
    ("generate", GEN.replace("{dalle}", "{clip}"), "is not a DALL-E workdir (it is a CLIP workdir)"),
    (
        "generate",
        GEN.replace("{dalle}", "{prior}"),
        "is not a DALL-E workdir (it is an unCLIP prior workdir)",
    ),
    ("generate", GEN.replace("{dalle}", "{empty}"), "empty"),
    ("generate", GEN + " --num_samples 0", "num_samples"),
    ("generate", GEN + " --num_samples -2", "num_samples"),
    ("generate", GEN + " --temperature -1", "temperature"),
    ("generate", GEN + " --temperature nan", "--temperature must be >= 0"),
    ("generate", GEN + " --top_p 1.5", "--top_p must be in (0, 1]"),
    ("generate", GEN + " --top_p 0", "--top_p must be in (0, 1]"),
    ("generate", GEN + " --top_k -1", "--top_k must be >= 0"),
    ("generate", GEN + " --cond_scale -2", "--cond_scale must be >= 0"),
    ("generate", GEN + " --cond_scale inf", "--cond_scale must be >= 0"),
    # ... and the checks made once the (real, tiny) DALL-E is loaded
    ("generate", GEN + " --top_k 33", "top_k must be in [0, 32]"),
    ("generate", GEN + " --step 5", "no checkpoint at step 5; it has step 0"),
    ("generate", GEN + " --image {good_png} --rows_kept 9", "rows_kept must be in [0, 4]"),
    ("generate", GEN + " --image {good_png} --inpaint_box 0,0,9,9", "4x4 token grid"),
    ("generate", GEN + " --dvae_workdir {clip}", "does not hold a dVAE"),
    ("generate", GEN + " --clip_workdir {dvae} --top_k_rerank 1", "not a CLIP workdir"),
    ("generate", GEN + " --batch_size 0", "batch_size"),
    ("generate", GEN + " --num_samples two", "num_samples"),
    ("generate", "--workdir {dalle} --out_dir {out}", "--prompt"),
    ("generate", GEN + " --prompts_file {prompts}", "--prompts_file"),
    ("generate", GEN.replace("--prompt 'a red circle'", "--prompts_file {missing}"), "missing"),
    # --- dalle_jax.unclip.generate
    ("unclip.generate", UNCLIP.replace("{prior}", "{dvae}"), "dVAE"),
    ("unclip.generate", UNCLIP.replace("{prior}", "{dalle}"), "DALL-E"),
    ("unclip.generate", UNCLIP.replace("{decoder}", "{prior}"), "prior"),
    ("unclip.generate", UNCLIP.replace("{decoder}", "{missing}"), "missing"),
    ("unclip.generate", UNCLIP + " --upsampler_workdir {decoder}", "decoder"),
    ("unclip.generate", UNCLIP + " --num_samples 0", "num_samples"),
    ("unclip.generate", UNCLIP + " --decoder_scale -1", "decoder_scale"),
    ("unclip.generate", UNCLIP + " --prior_scale -1", "prior_scale"),
    ("unclip.generate", UNCLIP + " --batch_size 0", "batch_size"),
    ("unclip.generate", UNCLIP + " --decoder_steps 0", "steps"),
    (
        "unclip.generate",
        UNCLIP.replace("--prompt 'a red circle'", "--prompts_file {empty_file}"),
        "no prompts",
    ),
    # --- dalle_jax.unclip.vary
    ("vary", VARY + " --input_dir {missing}", "missing"),
    ("vary", VARY + " --input_dir {garbage_dir}", "garbage"),
    ("vary", VARY + " --input_dir {empty}", "empty"),
    ("vary", VARY.replace("{decoder}", "{prior}") + " --input_dir {images}", "prior"),
    ("vary", VARY.replace("{decoder}", "{clip}") + " --input_dir {images}", "CLIP"),
    ("vary", VARY + " --input_dir {images} --num_samples 0", "num_samples"),
    ("vary", VARY + " --input_dir {images} --steps 0", "steps"),
    ("vary", VARY + " --input_dir {images} --cond_scale -1", "cond_scale"),
    ("vary", VARY + " --input_dir {images} --sampler euler9", "euler9"),
    ("vary", VARY + " --interpolate {good_png} {bad_png}", "bad.png"),
    ("vary", VARY + " --interpolate {good_png} {missing}/x.png", "x.png"),
    ("vary", VARY + " --input_dir {images} --upsampler_workdir {prior}", "prior"),
    # --- dalle_jax.evaluate_fidelity
    ("fidelity", FID, "--model"),
    ("fidelity", FID + " --model dalle", "--workdir"),
    ("fidelity", FID + " --model dalle --workdir {missing}", "missing"),
    ("fidelity", FID + " --model dalle --workdir {clip}", "is not a DALL-E workdir (it is a CLIP workdir)"),
    (
        "fidelity",
        FID + " --model dalle --workdir {decoder}",
        "not a DALL-E workdir (it is an unCLIP decoder workdir)",
    ),
    ("fidelity", FID + " --model dalle --workdir {dalle} --cond_scale -1", "--cond_scale must be >= 0"),
    ("fidelity", FID + " --model dalle --workdir {dalle} --top_p 2", "--top_p must be in (0, 1]"),
    ("fidelity", FID + " --model dalle --workdir {dalle} --top_k 33", "--top_k must be in [0, 32]"),
    ("fidelity", FID + " --model unclip --prior_workdir {dvae} --decoder_workdir {decoder}", "dVAE"),
    ("fidelity", FID + " --model unclip --prior_workdir {prior}", "--decoder_workdir"),
    ("fidelity", FID + " --model dalle --workdir {dalle} --num_prompts 0", "num_prompts"),
    ("fidelity", FID + " --model dalle --workdir {dalle} --num_samples -1", "num_samples"),
    ("fidelity", FID + " --model dalle --workdir {dalle} --split nosuch", "nosuch"),
    ("fidelity", FID + " --model dalle --workdir {dalle} --clip_workdir {dalle}", "DALL-E"),
    ("fidelity", FID + " --model gan", "gan"),
    # --- dalle_jax.reconstruct
    ("reconstruct", "--workdir {clip} --input_dir {images} --out_dir {out}", "does not hold a dVAE"),
    ("reconstruct", "--workdir {missing} --input_dir {images} --out_dir {out}", "missing"),
    ("reconstruct", "--workdir {dvae} --input_dir {missing} --out_dir {out}", "missing"),
    ("reconstruct", "--workdir {dvae} --input_dir {empty} --out_dir {out}", "empty"),
    ("reconstruct", "--workdir {dvae} --input_dir {garbage_dir} --out_dir {out}", "garbage"),
    ("reconstruct", "--workdir {dvae} --input_dir {images} --out_dir {out} --batch_size 0", "batch_size"),
    ("reconstruct", "--workdir {dvae} --input_dir {images}", "--out_dir"),
    # --- dalle_jax.convert_dvae
    ("convert_dvae", "--encoder {missing}/enc.pkl --decoder {missing}/dec.pkl --workdir {out}", "enc.pkl"),
    (
        "convert_dvae",
        "--encoder {good_npz} --decoder {good_npz} --workdir {out} --image_size -1",
        "unexpected weight",
    ),
    ("convert_dvae", "--encoder {good_npz} --workdir {out}", "--decoder"),
    ("convert_dvae", "--encoder {evil_pickle} --decoder {good_npz} --workdir {out}", "--trust_pickle"),
    ("convert_dvae", "--encoder {good_npz} --decoder {evil_zip} --workdir {out}", "posix.system"),
    # --- dalle_jax.attach_decoder
    ("attach_decoder", "--workdir {clip} --dvae_workdir {dvae}", "names no dvae_workdir"),
    ("attach_decoder", "--workdir {dalle} --dvae_workdir {clip}", "{clip} does not hold a dVAE"),
    ("attach_decoder", "--workdir {empty} --dvae_workdir {dvae}", "empty"),
    ("attach_decoder", "--workdir {dalle}", "--dvae_workdir"),
    # --- clip_jax.evaluate / classify / embed / convert
    ("evaluate", "--workdir {dalle}", "not a CLIP workdir"),
    ("evaluate", "--workdir {dvae}", "not a CLIP workdir"),
    ("evaluate", "--workdir {missing}", "missing"),
    ("evaluate", "--workdir {empty}", "empty"),
    ("evaluate", "--workdir {clip} --step -1", "no checkpoint at step -1; it has step 0"),
    ("evaluate", "--workdir {clip} --step 7", "{clip} has no checkpoint at step 7; it has step 0"),
    ("evaluate", "--workdir {clip} --step x", "--step"),
    ("classify", CLASSIFY.replace("{clip}", "{dalle}"), "not a CLIP workdir"),
    ("classify", CLASSIFY.replace("{clip}", "{decoder}"), "not a CLIP workdir"),
    ("classify", CLASSIFY.replace("{images}", "{garbage_dir}"), "garbage"),
    ("classify", CLASSIFY.replace("{classes}", "{missing}"), "missing"),
    ("classify", CLASSIFY + " --batch_size 0", "batch_size"),
    ("classify", CLASSIFY + " --templates_file {empty_file}", "templates"),
    ("classify", CLASSIFY + " --step 99", "no checkpoint at step 99; it has step 0"),
    ("embed", EMBED, "--input_dir"),
    ("embed", EMBED.replace("{clip}", "{dalle}") + " --texts_file {classes}", "not a CLIP workdir"),
    ("embed", EMBED + " --texts_file {empty_file}", "empty"),
    ("embed", EMBED + " --texts_file {missing}", "missing"),
    ("embed", EMBED + " --input_dir {garbage_dir}", "garbage"),
    ("embed", EMBED + " --input_dir {images} --batch_size -4", "batch_size"),
    ("convert", "--source nosuch --checkpoint {good_npz} --workdir {out}", "nosuch"),
    ("convert", "--source open_clip --checkpoint {good_npz} --workdir {out}", "--model"),
    (
        "convert",
        "--source openai --checkpoint {evil_pickle} --model ViT-B-32 --workdir {out}",
        "--trust_pickle",
    ),
    (
        "convert",
        "--source open_clip --checkpoint {evil_zip} --model ViT-B-32 --workdir {out}",
        "posix.system",
    ),
    # --- launchers (--dry_run: they would print what they run)
    ("tpu_pod", f"create {POD} --accelerator_type v9-8 --dry_run", "v9-8"),
    ("tpu_pod", f"create {POD} --dry_run", "--accelerator_type"),
    ("tpu_pod", f"run {POD} --dry_run", "--command"),
    ("tpu_pod", f"run {POD} --command ls --env NOEQUALS --dry_run", "NOEQUALS"),
    ("tpu_pod", f"logs {POD} --lines abc --dry_run", "lines"),
    ("tpu_pod", f"create {POD} --accelerator_type v4-32 --num_slices 0 --dry_run", "num_slices"),
    ("tpu_pod", f"reboot {POD} --dry_run", "reboot"),
    ("tpu_pod", f"logs {POD} --worker x --dry_run", "--worker"),
    ("tpu_pod", f"logs {POD} --worker -1 --dry_run", "--worker"),
    ("tpu_pod", f"logs {POD} --worker 0,x --dry_run", "--worker"),
    ("tpu_pod", f"logs {POD} --lines -5 --dry_run", "--lines"),
    ("tpu_pod", f"logs {POD} --slice 1 --dry_run", "--slice"),
    ("tpu_pod", f"logs {POD} --slice x --dry_run", "--slice"),
    ("tpu_pod", f"create {POD} --accelerator_type v4-0 --dry_run", "v4-0"),
    ("tpu_pod", f"create {POD} --accelerator_type v4-0 --runtime_version r --dry_run", "v4-0"),
    ("tpu_pod", f"setup {POD} --num_slices -1 --dry_run", "num_slices"),
    ("tpu_pod", f"run {POD} --command ls --num_slices 0 --dry_run", "num_slices"),
    ("tpu_pod", f"stop {POD} --num_slices x --dry_run", "num_slices"),
    ("tpu_pod", f"delete {POD} --num_slices 0 --dry_run", "num_slices"),
    ("slurm", SLURM + " --nodes 0", "nodes"),
    ("slurm", SLURM + " --nodes two", "nodes"),
    ("slurm", SLURM + " --gpus_per_node -1", "gpus_per_node"),
    ("slurm", SLURM + " --time forever", "forever"),
    ("slurm", SLURM + " --env NOEQUALS", "NOEQUALS"),
    ("slurm", SLURM + " --port 99999", "port"),
    ("slurm", SLURM + " --port 0", "port"),
    ("slurm", SLURM + " --cpus_per_task 0", "cpus_per_task"),
    ("slurm", SLURM + " --cpus_per_task x", "cpus_per_task"),
    ("slurm", "--dry_run", "--command"),
]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """Tiny workdirs of every kind and the bad files the cases point at, under one root."""
    root = tmp_path_factory.mktemp("bad_input")
    p = {name: str(root / name) for name in ("clip", "dvae", "decoder", "prior", "dalle", "empty", "images")}
    wd_lib.tiny_clip_workdir(p["clip"])
    wd_lib.tiny_dvae_workdir(p["dvae"])
    wd_lib.tiny_unclip_decoder_workdir(p["decoder"], p["clip"])
    wd_lib.tiny_unclip_prior_workdir(p["prior"], p["clip"])
    wd_lib.tiny_dalle_workdir(p["dalle"], p["dvae"])  # real: commands get past loading it
    os.makedirs(p["empty"])
    os.makedirs(p["images"])
    good = encode_image(np.full((16, 16, 3), 128, np.uint8))
    (root / "images" / "a.png").write_bytes(good)
    os.makedirs(root / "garbage")
    (root / "garbage" / "garbage.png").write_bytes(b"\x00not an image" * 16)
    (root / "bad.png").write_bytes(b"\x89PNG but not really" * 8)
    (root / "good.png").write_bytes(good)
    (root / "empty.txt").write_text("")
    (root / "prompts.txt").write_text("\n  \n\n")
    (root / "classes.txt").write_text("cat\ndog\n")
    np.savez(root / "weights.npz", w=np.zeros(3, np.float32))
    os.makedirs(root / "escaping_tokens")
    split = {"examples": 1, "shards": ["../weights.npz"]}
    model = load_config("dalle_shapes").model  # shards the model takes, but one lies outside
    index = dict(grid_size=model.image_grid, vocab_size=model.image_vocab_size, image_size=64)
    index["splits"] = dict(train=split, test_unseen=split)
    (root / "escaping_tokens" / "index.json").write_text(json.dumps(index))
    (root / "model.pkl").write_bytes(b"\x80\x04\x95" + b"\x00" * 20)
    os.makedirs(root / "evil")  # pickles that would create root/marker: "nothing written" catches it
    evil = malicious_files(root / "evil", str(root / "marker"))
    p.update(
        root=str(root),
        out=str(root / "out"),
        missing=str(root / "missing"),
        garbage_dir=str(root / "garbage"),
        bad_png=str(root / "bad.png"),
        good_png=str(root / "good.png"),
        empty_file=str(root / "empty.txt"),
        prompts=str(root / "prompts.txt"),
        classes=str(root / "classes.txt"),
        good_npz=str(root / "weights.npz"),
        pickle=str(root / "model.pkl"),
        evil_pickle=evil["protocol2_system.pkl"],
        evil_zip=evil["zip_archive.pt"],
        escaping_tokens=str(root / "escaping_tokens"),
    )
    return p


def snapshot(root):
    """Every file and folder under root with its size and modification time."""
    seen = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.stat(path)
            seen[path] = (st.st_size, st.st_mtime_ns)
    return seen


_BASE_FLAGS: set | None = None


def _reset_absl_flags():
    """Back to the flags this file found: the next command defines its own again (its --config
    reads sys.argv when it is defined)."""
    for name in list(flags.FLAGS):
        if name not in _BASE_FLAGS or name == "config" or name.startswith("config.") or name == "workdir":
            delattr(flags.FLAGS, name)
    flags.FLAGS.unparse_flags()


def run_entry(entry: str, argv: list[str], monkeypatch) -> int | str:
    """The exit code of one command, or the traceback text when it raised."""
    global _BASE_FLAGS
    module, function, style = ENTRIES[entry]
    fn = getattr(importlib.import_module(module), function)
    try:
        if style == "argv":
            return fn(argv) or 0
        if _BASE_FLAGS is None:
            _BASE_FLAGS = set(flags.FLAGS)
        _reset_absl_flags()
        monkeypatch.setattr(sys, "argv", [module, *argv])
        try:
            fn()
        finally:
            _reset_absl_flags()
        return 0
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    except Exception:  # noqa: BLE001  (the test reports it)
        return traceback.format_exc()


@pytest.mark.parametrize("entry,args,problem", CASES, ids=[f"{c[0]}:{c[1]}" for c in CASES])
def test_bad_input_is_one_error_line_and_writes_nothing(paths, entry, args, problem, monkeypatch, capsys):
    argv = shlex.split(args.format(**paths))
    before = snapshot(paths["root"])
    code = run_entry(entry, argv, monkeypatch)
    err = capsys.readouterr().err
    assert isinstance(code, int), f"traceback:\n{code}"
    assert code == 2, (code, err[-2000:])
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), err[-2000:]
    assert problem.format(**paths) in lines[-1], lines[-1]
    assert snapshot(paths["root"]) == before, "wrote or changed files"


def test_the_table_covers_every_entry_point_and_a_hundred_cases():
    assert {c[0] for c in CASES} == set(ENTRIES)
    assert len(CASES) >= 100
