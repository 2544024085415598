"""The fine-tuning command end to end on a tiny model and a few synthetic documents."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from florence2 import Florence2
from florence2.model import shift_right
from florence2.processor import Florence2Processor
from training.docvqa import main, parse_args
from training.metrics import anls_per_question, levenshtein_similarity
from training.tasks import get_task

from .conftest import TRAIN_IMAGE_SIZE as IMAGE_SIZE
from .conftest import detection_args, last_checkpoint, metrics, prepared, train_args, train_losses

pytestmark = pytest.mark.usefixtures("one_thread")  # the tiny model's ops are too small to share out


def run(model_dir, data_dir, out, *extra):
    return main(train_args(model_dir, data_dir, out, *extra))


def test_defaults_are_the_blog_recipe():
    args = parse_args(["--output-dir", "x"])
    task = get_task(args.task, args.prompt_template)
    assert (args.model, args.dataset, args.task, task.prompt_template) == (
        "microsoft/Florence-2-base-ft", "HuggingFaceM4/DocumentVQA", "<DocVQA>", "<DocVQA>{question}")
    assert (args.lr, args.epochs, args.batch_size, args.warmup_steps, args.weight_decay) == (1e-6, 7, 6, 0, 0.0)
    assert not args.train_vision and args.num_beams == 3 and args.max_new_tokens is None
    assert (task.max_new_tokens, task.max_target_tokens) == (64, 256)  # the task's, when not given


def test_run_writes_metrics_plot_and_loadable_checkpoints(tiny_model_dir, dataset_dir, tmp_path):
    out = tmp_path / "run"
    summary = run(tiny_model_dir, dataset_dir, out, "--eval-before-training")
    records = metrics(out)
    assert {"step", "train_loss", "lr", "samples_per_s"} <= set(records[1])
    evals = [r for r in records if "eval_anls" in r]
    assert [r["step"] for r in evals] == [0, summary["steps"] // 2, summary["steps"]]
    assert all(0.0 <= r["eval_anls"] <= 1.0 and r["eval_loss"] > 0 for r in evals)
    # the last evaluation's numbers are those of its predictions, as written
    predicted = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    answers, references = [p["prediction"] for p in predicted], [p["reference"]["answers"] for p in predicted]
    assert len(predicted) == evals[-1]["eval_examples"]
    assert evals[-1]["eval_anls"] == pytest.approx(sum(anls_per_question(answers, references)) / len(predicted))
    assert evals[-1]["eval_blog_similarity"] == pytest.approx(levenshtein_similarity(answers, references))
    assert (out / "metrics.png").stat().st_size > 0
    checkpoints = sorted((out / "checkpoints").iterdir())
    assert [p.name for p in checkpoints] == [f"step-{summary['steps'] // 2:08d}", f"step-{summary['steps']:08d}"]
    model = Florence2.from_pretrained(checkpoints[-1])
    assert Florence2Processor.from_pretrained(checkpoints[-1]).image_size == (IMAGE_SIZE, IMAGE_SIZE)
    assert (out / "best" / "model.safetensors").is_file() and summary["best_step"] in (
        summary["steps"] // 2, summary["steps"])
    assert not torch.equal(model.image_projection.weight,
                           Florence2.from_pretrained(tiny_model_dir).image_projection.weight)


def test_frozen_vision_tower_gets_no_gradient_and_stays_identical(tiny_model_dir, dataset_dir, tmp_path):
    out = tmp_path / "run"
    run(tiny_model_dir, dataset_dir, out, "--max-steps", "2")  # the default: vision tower frozen
    before = Florence2.from_pretrained(tiny_model_dir)
    after = Florence2.from_pretrained(out / "checkpoints" / "step-00000002")
    for (name, a), b in zip(before.vision_tower.state_dict().items(), after.vision_tower.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(before.language_model.shared.weight, after.language_model.shared.weight)


def test_frozen_text_encoder_stays_identical_while_the_tower_below_it_trains(tiny_model_dir, dataset_dir, tmp_path):
    out = tmp_path / "run"
    run(tiny_model_dir, dataset_dir, out, "--max-steps", "2", "--train-vision", "--no-train-text-encoder")
    before = Florence2.from_pretrained(tiny_model_dir)
    after = Florence2.from_pretrained(out / "checkpoints" / "step-00000002")
    encoder = before.language_model.encoder.state_dict()
    for name, tensor in after.language_model.encoder.state_dict().items():
        assert torch.equal(encoder[name], tensor), name
    # the gradient goes through the frozen encoder to the image tokens and the tower, and the decoder trains
    assert not torch.equal(before.vision_tower.state_dict()["convs.0.conv.weight"],
                           after.vision_tower.state_dict()["convs.0.conv.weight"])
    assert not torch.equal(before.image_projection.weight, after.image_projection.weight)
    assert not torch.equal(before.language_model.decoder.layers[0].fc1.weight,
                           after.language_model.decoder.layers[0].fc1.weight)


def test_frozen_text_encoder_is_refused_with_lora(capsys):
    with pytest.raises(SystemExit) as stopped:
        parse_args(["--output-dir", "x", "--lora", "--no-train-text-encoder"])
    assert stopped.value.code == 2 and "--no-train-text-encoder is for full fine-tuning" in capsys.readouterr().err


def test_one_step_lowers_the_loss_on_a_fixed_batch(tiny_model_dir):
    torch.manual_seed(0)
    model = Florence2.from_pretrained(tiny_model_dir)
    pixel_values = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    input_ids = torch.tensor([[0, 100, 200, 2], [0, 300, 2, 1]])
    labels = torch.tensor([[0, 500, 600, 2], [0, 700, 2, -100]])

    def loss():
        model.eval()
        with torch.no_grad():
            return model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=(input_ids != 1).long(),
                         labels=labels).loss

    before = loss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=(input_ids != 1).long(),
          labels=labels).loss.backward()
    optimizer.step()
    assert loss() < before - 0.1


def test_padded_labels_do_not_change_the_loss(tiny_model_dir):
    model = Florence2.from_pretrained(tiny_model_dir).eval()
    text = model.config.text
    pixel_values = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    input_ids = torch.tensor([[0, 100, 200, 2]])
    labels = torch.tensor([[0, 500, 600, 2]])
    padded = torch.cat([labels, torch.full((1, 5), -100)], dim=1)
    with torch.no_grad():
        losses = []
        for lab in (labels, padded):
            logits = model(pixel_values=pixel_values, input_ids=input_ids,
                           decoder_input_ids=shift_right(lab, text.decoder_start_token_id, text.pad_token_id)).logits
            losses.append(F.cross_entropy(logits.flatten(0, 1), lab.flatten(), ignore_index=-100))
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=1e-6)


def test_vision_lr_and_embedding_eps_get_optimizer_groups_of_their_own(tiny_model_dir, dataset_dir, tmp_path):
    args = parse_args(train_args(tiny_model_dir, dataset_dir, tmp_path / "run", "--train-vision", "--vision-lr", "1e-4",
                                 "--embedding-eps", "3e-4"))
    trainer = prepared(args)
    group_of = {id(p): group for group in trainer.optimizer.param_groups for p in group["params"]}
    assert len(group_of) == sum(1 for p in trainer.module.parameters() if p.requires_grad)  # each weight once
    embedding = trainer.module.language_model.shared.weight
    assert (group_of[id(embedding)]["initial_lr"], group_of[id(embedding)]["eps"]) == (1e-3, 3e-4)
    assert {(group_of[id(p)]["initial_lr"], group_of[id(p)]["eps"]) for p in trainer.module.vision_tower.parameters()} \
        == {(1e-4, 1e-8)}
    projection = trainer.module.image_projection.weight
    assert (group_of[id(projection)]["initial_lr"], group_of[id(projection)]["eps"]) == (1e-3, 1e-8)

    plain = prepared(parse_args(train_args(tiny_model_dir, dataset_dir, tmp_path / "plain")))
    assert len(plain.optimizer.param_groups) == 1  # the tower is frozen, nothing asked: AdamW as the blog has it
    for wrong in (["--vision-lr", "1e-4"], ["--optimizer", "sgd", "--embedding-eps", "1e-3"],
                  ["--train-vision", "--vision-lr", "0"]):
        with pytest.raises(SystemExit):
            parse_args(train_args(tiny_model_dir, dataset_dir, tmp_path / "x", *wrong))


@pytest.mark.parametrize("recipe", [(), ("--train-vision", "--vision-lr", "1e-4", "--embedding-eps", "3e-4")],
                         ids=["blog", "optimizer-groups"])
def test_stopped_and_resumed_gives_the_same_losses(tiny_model_dir, dataset_dir, tmp_path, recipe):
    straight = tmp_path / "straight"
    run(tiny_model_dir, dataset_dir, straight, "--save-every", "2", "--keep-last", "0", *recipe)
    # a run that stopped after step 2: its output folder holds only what was saved then
    stopped = tmp_path / "stopped"
    shutil.copytree(straight / "checkpoints" / "step-00000002", stopped / "checkpoints" / "step-00000002")
    run(tiny_model_dir, dataset_dir, stopped, "--save-every", "2", "--keep-last", "0", "--resume", "auto", *recipe)
    expected = [loss for step, loss in train_losses(straight) if step > 2]
    assert [loss for step, loss in train_losses(stopped)] == expected
    final = last_checkpoint(straight).name
    a = Florence2.from_pretrained(straight / "checkpoints" / final)
    b = Florence2.from_pretrained(stopped / "checkpoints" / final)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


def test_detection_with_grad_accum_stopped_and_resumed_gives_the_same_losses(tiny_model_dir, detection_exports,
                                                                            tmp_path):
    def argv(out, *extra):  # batch 1 x 2 micro-steps: 2 steps an epoch of the 4 images, dropout on
        return detection_args(tiny_model_dir, detection_exports["coco"], out, "--batch-size", "1", "--grad-accum",
                              "2", "--epochs", "2", "--save-every", "2", "--keep-last", "0", *extra)

    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    main(argv(straight))
    shutil.copytree(straight / "checkpoints" / "step-00000002", stopped / "checkpoints" / "step-00000002")
    main(argv(stopped, "--resume", "auto"))
    assert [step for step, _ in train_losses(straight)] == [1, 2, 3, 4]
    assert train_losses(stopped) == [(step, loss) for step, loss in train_losses(straight) if step > 2]
    a = Florence2.from_pretrained(last_checkpoint(straight)).state_dict()
    b = Florence2.from_pretrained(last_checkpoint(stopped)).state_dict()
    for (name, x), y in zip(a.items(), b.values()):
        assert torch.equal(x, y), name
