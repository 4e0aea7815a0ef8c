"""transformers.Trainer callback: tiny BERT / GPT-2 / tied-embedding GPT-2 text classifiers
built from configs (no download), recorded into the plain loop's store schema."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from reference import eps_one, perturbed_copy, quantities_one  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    Trainer,
    TrainingArguments,
)
from transformers.modeling_outputs import SequenceClassifierOutput  # noqa: E402

import sam_diagnostics as sd  # noqa: E402
from sam_diagnostics import open_run  # noqa: E402
from sam_diagnostics.integrations.hf import (  # noqa: E402
    DiagnosticsCallback,
    TextClassifier,
    pack_examples,
    unwrap_model,
)

VOCAB, C = 40, 3
PER_EXAMPLE = ("loss", "margin", "logit_scale", "jacobian_norm", "grad_norm", "activation_norm")
CURVES = ("train_loss", "train_accuracy", "clean_train_accuracy", "noisy_train_accuracy",
          "test_loss", "test_accuracy")


def bert():
    return BertForSequenceClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16, num_labels=C, pad_token_id=0))


def gpt2():
    return GPT2ForSequenceClassification(GPT2Config(
        vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=16, num_labels=C,
        pad_token_id=0, bos_token_id=1, eos_token_id=1))


class Verbalizer(nn.Module):
    """A prompt-style classifier on a GPT-2 LM with tied input/output embeddings: the class
    logits are the LM logits of ``C`` label tokens at the last non-padding position."""

    def __init__(self, class_tokens=(5, 6, 7)):
        super().__init__()
        self.lm = GPT2LMHeadModel(GPT2Config(
            vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=16, pad_token_id=0,
            bos_token_id=1, eos_token_id=1))
        assert self.lm.lm_head.weight is self.lm.transformer.wte.weight
        self.config = self.lm.config
        self.register_buffer("class_tokens", torch.tensor(class_tokens), persistent=False)

    def forward(self, input_ids, attention_mask=None, position_ids=None, labels=None):
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask,
                      position_ids=position_ids)
        last = (input_ids != 0).long().cumsum(-1).argmax(-1)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        logits = out.logits[rows, last][:, self.class_tokens]
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def examples(n, seed, noise=0.25):
    """Variable-length token sequences; the label is which of tokens 5/6/7 occurs most."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(4, 9, (1,), generator=g))
        ids = torch.randint(2, VOCAB, (length,), generator=g)
        true = int(torch.stack([(ids == t).sum() for t in (5, 6, 7)]).argmax())
        label = int(torch.randint(0, C, (1,), generator=g)) if i < n * noise else true
        out.append({"input_ids": ids.tolist(), "attention_mask": [1] * length, "label": label,
                    "true_label": true, "example_id": 1000 + i})
    return out


def collate(features):
    """Right-pad to the longest (the role of DataCollatorWithPadding without a tokenizer)."""
    S = max(len(f["input_ids"]) for f in features)
    batch = {k: torch.tensor([f[k] + [0] * (S - len(f[k])) for f in features])
             for k in ("input_ids", "attention_mask")}
    batch["labels"] = torch.tensor([f["label"] for f in features])
    return batch


def packed(n=6, seed=0):
    ds = pack_examples(examples(n, seed), collator=collate)
    return ds.inputs.double(), ds.labels


def test_pack_examples_metadata_and_padding():
    ex = examples(8, 0)
    ds = pack_examples(ex)
    assert ds.inputs.shape == (8, 2, max(len(e["input_ids"]) for e in ex))
    assert ds.example_ids.tolist() == list(range(1000, 1008))
    assert ds.is_noisy.tolist() == [e["label"] != e["true_label"] for e in ex]
    assert ds.num_classes == C or ds.num_classes == max(e["label"] for e in ex) + 1
    row = ds.inputs[0]
    n = len(ex[0]["input_ids"])
    assert row[0, :n].long().tolist() == ex[0]["input_ids"] and (row[1, n:] == 0).all()
    assert torch.equal(pack_examples(ex, collator=collate).inputs, ds.inputs)
    assert pack_examples(ds) is ds
    with pytest.raises(KeyError, match="keys"):
        pack_examples([{"ids": [1], "label": 0}])


@pytest.mark.parametrize("make", [bert, gpt2, Verbalizer], ids=["bert", "gpt2", "tied-gpt2"])
def test_wrapper_keeps_logits_and_probe_matches_naive_loop(make):
    torch.manual_seed(0)
    model = make().double().eval()
    wrapped = TextClassifier(model)
    x, y = packed()
    ids, mask = x[:, 0].long(), x[:, 1].long()
    with torch.no_grad():
        assert torch.allclose(wrapped(x), model(input_ids=ids, attention_mask=mask).logits,
                              atol=1e-12)
    head = "model.lm.lm_head" if make is Verbalizer else None
    got = sd.Probe(wrapped, head=head).measure(x, y, rho=0.05)
    head_module = wrapped.get_submodule(got.attrs["head"])
    for i in range(x.shape[0]):
        ref = quantities_one(wrapped, x[i], y[i], head_module)
        sam = perturbed_copy(wrapped, eps_one(wrapped, x[i], y[i], 0.05))
        ref_sam = quantities_one(sam, x[i], y[i], sam.get_submodule(got.attrs["head"]))
        for view, r in (("sgd", ref), ("sam", ref_sam)):
            for name in ("loss", "jacobian_norm", "grad_norm", "activation_norm"):
                value = got[name].sel(view=view).isel(example=i)
                if name == "activation_norm":
                    value = value.isel(layer=0)
                np.testing.assert_allclose(float(value), float(r[name]), rtol=1e-8,
                                           err_msg=f"{name} ({view}) of example {i}")


def _train(tmp_path, model, *, epochs=2, live=None, attach=True, every_steps=None, **options):
    train, test = examples(48, 0), examples(24, 1, noise=0.0)
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"), num_train_epochs=epochs,
        per_device_train_batch_size=8, per_device_eval_batch_size=16, learning_rate=3e-3,
        logging_steps=2, save_strategy="no", eval_strategy="epoch", report_to="none",
        use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0)
    cb = DiagnosticsCallback(tmp_path / "run.zarr", probe=16, test=test, live=live,
                             every_steps=every_steps, config={"noise_rate": 0.25},
                             **options)
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=test,
                      data_collator=collate, callbacks=[cb])
    if attach:
        cb.attach(trainer)
    trainer.train()
    return cb, trainer


def test_trainer_callback_records_the_plain_loop_schema(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.manual_seed(0)
    model = bert()
    initial = copy.deepcopy(model)
    cb, trainer = _train(tmp_path, model, live=tmp_path / "tb")
    ds = open_run(tmp_path / "run.zarr")
    steps_per_epoch = 48 // 8
    assert ds["step"].values.tolist() == [0, steps_per_epoch, 2 * steps_per_epoch]
    assert ds["epoch"].values.tolist() == [0.0, 1.0, 2.0]
    for name in PER_EXAMPLE:
        assert name in ds and np.isfinite(ds[name].values).all(), name
        assert ds[name].dims[:3] == ("step", "view", "example")
    for name in CURVES:
        assert np.isfinite(ds[name].values).all(), name
    assert {"is_noisy", "true_label", "label", "layer", "module"} <= set(ds.coords)
    assert ds.sizes["example"] == 16 and ds["is_noisy"].values.any()
    assert ds.attrs["complete"] == 1 and ds.attrs["model"] == "bert"
    assert ds.attrs["head"] == "model.classifier" and ds.attrs["noise_rate"] == 0.25
    # the model was trained (the Trainer's optimizer), and recorded as it was at each step
    assert not np.allclose(ds["last_layer_weight_norm"].values[0],
                           ds["last_layer_weight_norm"].values[-1])
    final = TextClassifier(unwrap_model(trainer.model))
    assert float(ds["last_layer_weight_norm"].values[-1]) == pytest.approx(
        float(final.model.classifier.weight.detach().norm()), rel=1e-6)
    # step 0 is the initial model, measured on the probe set
    probe = cb.recorder.probe_set
    first = sd.Probe(TextClassifier(initial), method="exact").measure(
        probe.inputs, probe.labels, rho=cb.recorder.rho)
    np.testing.assert_allclose(ds["jacobian_norm"].isel(step=0).values,
                               first["jacobian_norm"].values, rtol=1e-4)
    # the same figures as a plain loop's run
    assert {p.stem for p in ds.sd.plot(out_dir=tmp_path / "fig")} >= {"accuracy",
                                                                       "logit_scale"}
    # live scalars: TensorBoard event file, and the Trainer's own log history
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    events = acc.Scalars("sd/logit_scale_ratio/clean")
    assert [e.step for e in events] == ds["step"].values.tolist()
    logged = [h for h in trainer.state.log_history if "sd/accuracy/test" in h]
    assert [h["step"] for h in logged] == ds["step"].values.tolist()
    assert logged[-1]["sd/accuracy/test"] == pytest.approx(float(ds["test_accuracy"][-1]))


@pytest.mark.parametrize("make", [gpt2, Verbalizer], ids=["gpt2", "tied-gpt2"])
def test_trainer_callback_on_gpt2_models(tmp_path, make):
    torch.manual_seed(0)
    # the tied LM head has VOCAB outputs of which the model returns C: name it
    options = {"probe_options": {"head": "model.lm.lm_head"}} if make is Verbalizer else {}
    cb, _ = _train(tmp_path, make(), epochs=1, attach=False, every_steps=4, **options)
    assert cb.recorder.probe.head == ("model.lm.lm_head" if make is Verbalizer else "model.score")
    ds = cb.dataset
    assert ds["step"].values.tolist() == [0, 4, 6]
    assert ds["epoch"].values.tolist() == pytest.approx([0.0, 4 / 6, 1.0])  # 6 steps/epoch
    for name in (*PER_EXAMPLE, "test_accuracy", "last_layer_weight_norm"):
        assert np.isfinite(ds[name].values).all(), name


def test_unwrap_model():
    model = bert()
    assert unwrap_model(nn.DataParallel(model)) is model
    assert unwrap_model(model) is model


def test_recording_does_not_change_training(tmp_path):
    """Same seed with and without the callback: bit-identical weights after training."""
    finals = []
    for with_callback in (False, True):
        torch.manual_seed(0)
        model = bert()
        args = TrainingArguments(
            output_dir=str(tmp_path / f"t{with_callback}"), num_train_epochs=1,
            per_device_train_batch_size=8, learning_rate=3e-3, save_strategy="no",
            report_to="none", use_cpu=True, disable_tqdm=True, seed=0)
        callbacks = [DiagnosticsCallback(None, probe=8, every_steps=2)] if with_callback else []
        Trainer(model=model, args=args, train_dataset=examples(32, 0), data_collator=collate,
                callbacks=callbacks).train()
        finals.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    for name, value in finals[0].items():
        assert torch.equal(value, finals[1][name]), name


def test_sam_trainer_step_is_the_sam_update(tmp_path):
    """One SGD step of SAMTrainer = w - lr ∇L(w + ρ ∇L(w)/‖∇L(w)‖), computed by hand."""
    from sam_diagnostics.integrations.hf import SAMTrainer

    def make():
        torch.manual_seed(0)
        return BertForSequenceClassification(BertConfig(
            vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=32, max_position_embeddings=16, num_labels=C, pad_token_id=0,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))

    train, rho, lr = examples(8, 0), 0.05, 0.1
    model = make()
    reference = make()
    cb = DiagnosticsCallback(None, probe=8, every_steps=1)
    args = TrainingArguments(
        output_dir=str(tmp_path / "t"), max_steps=1, per_device_train_batch_size=8,
        learning_rate=lr, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0,
        weight_decay=0.0, save_strategy="no", report_to="none", use_cpu=True,
        disable_tqdm=True, seed=0)
    SAMTrainer(model=model, args=args, rho=rho, train_dataset=train, data_collator=collate,
               callbacks=[cb]).train()

    batch = collate(train)
    params = [p for p in reference.parameters() if p.requires_grad]
    g = torch.autograd.grad(reference(**batch).loss, params)
    norm = torch.sqrt(sum(v.pow(2).sum() for v in g))
    with torch.no_grad():
        for p, v in zip(params, g):
            p.add_(rho * v / norm)
    g2 = torch.autograd.grad(reference(**batch).loss, params)
    with torch.no_grad():
        for p, v, v2 in zip(params, g, g2):
            p.sub_(rho * v / norm + lr * v2)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    ds = cb.dataset
    assert ds.attrs["optimizer"] == "sam" and ds.attrs["rho"] == rho
    assert ds["step"].values.tolist() == [0, 1]
