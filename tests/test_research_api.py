"""Research code's own pieces through ``fit``: a Flax module, an optax optimizer, a loss, metrics, augmentations,
callbacks and writers, the moving average; and the errors that name the fix."""

from __future__ import annotations

import json
import struct

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import F32, strip_times

from jaxcifar.data import make_pipeline, register_augmentation
from jaxcifar.data.mix import cutmix, mixup
from jaxcifar.errors import CheckpointError, ConfigError
from jaxcifar.models import register_model
from jaxcifar.train import Callback, ProfileTrace, TrainConfig, cross_entropy, fit, load_trained

CFG = TrainConfig(epochs=2, batch_size=32, val_size=64, log_every=4, unroll=2, eval_batch_size=64)


class TinyCNN(nn.Module):
    """A researcher's module: conv, batch norm, optional dropout through ``dropout_rate``."""

    features: int = 8
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False, dropout_rate=None):
        x = nn.relu(nn.Conv(self.features, (3, 3))(x))
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = x.mean(axis=(1, 2))
        if train and dropout_rate is not None:  # a traced rate: fit can vary it per run
            keep = 1.0 - dropout_rate
            x = jnp.where(jax.random.bernoulli(self.make_rng("dropout"), keep, x.shape), x / keep, 0.0)
        return nn.Dense(self.num_classes, name="head")(x)


class NoTrainArg(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(10)(x.mean(axis=(1, 2)))


class NoDropoutArg(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(10, name="head")(x.mean(axis=(1, 2)))


def top3(logits, labels):
    hits = (jnp.argsort(logits, -1)[:, -3:] == labels[:, None]).any(-1)
    return {"top3": hits.astype(jnp.float32)}


ADAMW = optax.inject_hyperparams(optax.adamw)(learning_rate=3e-3, weight_decay=1e-4)


class Interrupt(Exception):
    pass


class StopAfter(Callback):
    """Kills the fit (an exception) after epoch ``epoch``, after its checkpoint and logs are written."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_epoch(self, event):
        if event.epoch == self.epoch:
            raise Interrupt


def test_own_module_optimizer_mixup_and_metric_learn_resume_exactly_and_restore(tiny, tmp_path):
    cfg = CFG.replace(epochs=3, augment=("flip", ("mixup", {"alpha": 0.4})), checkpoint_every=2)
    pieces = {"model": TinyCNN(), "tx": ADAMW, "loss_fn": cross_entropy, "metrics_fn": top3}
    full = fit(cfg, tiny, progress=False, log_dir=str(tmp_path / "full"), **pieces)
    assert full.history["train_loss"][-1] < full.history["train_loss"][0]
    assert full.summary["test_accuracy"] > 0.3  # 10 classes: chance is 0.1
    assert len(full.history["train_top3"]) == 3 and len(full.history["val_top3"]) == 3
    assert "top3" in full.history["interval"] and "test_top3" in full.summary
    assert full.history["lr"] == [pytest.approx(3e-3)] * 3  # the injected learning rate of the user's adamw

    ck = tmp_path / "ck"
    with pytest.raises(Interrupt):  # killed after epoch 3's logs, with the last checkpoint at epoch 2
        fit(cfg.replace(epochs=4), tiny, checkpoint_dir=str(ck), progress=False, callbacks=[StopAfter(3)], **pieces)
    resumed = fit(cfg, tiny, checkpoint_dir=str(ck), progress=False, **pieces)
    assert strip_times(resumed.histories) == strip_times(full.histories)
    chex.assert_trees_all_equal(resumed.state.params, full.state.params)
    lines = [json.loads(line) for line in (ck / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k != "epoch_seconds"} for r in lines] == \
           [{k: v for k, v in r.items() if k != "epoch_seconds"} for r in expected]

    trained = load_trained(ck, "latest", model=TinyCNN())
    expect = jax.jit(full.fns.probabilities)(full.state.variables, tiny.test.images[:16])
    # Restored weights are bit-identical; only the prediction program may differ (batching, fusion): the
    # softmax of logits that moved by a few roundings, relative 1e-6 of probabilities themselves.
    np.testing.assert_allclose(trained.probabilities(tiny.test.images[:16]), expect, rtol=1e-6, atol=1e-7)
    with pytest.raises(CheckpointError, match="model=<that module>"):
        load_trained(ck)
    with pytest.raises(CheckpointError, match="fields differ"):
        load_trained(ck, model=TinyCNN(features=16))


def test_run_axis_over_the_learning_rate_of_an_injected_user_optimizer_matches_single_runs(tiny):
    runs = [{"seed": 0, "learning_rate": 1e-3}, {"seed": 1, "learning_rate": 1e-2}]
    both = fit(CFG.replace(epochs=1), tiny, runs=runs, model=TinyCNN(), tx=ADAMW, progress=False)
    for run, history in zip(runs, both.histories, strict=True):
        tx = optax.inject_hyperparams(optax.adamw)(learning_rate=run["learning_rate"], weight_decay=1e-4)
        config = CFG.replace(epochs=1, seed=run["seed"], split_seed=0)  # the sweep's split
        single = fit(config, tiny, model=TinyCNN(), tx=tx, progress=False)
        # The loop strategy traces each run with the single run's operations; only XLA's fusion of the larger
        # program may re-associate a reduction (~1e-7 relative), which 14 Adam steps grow to ~1e-6: 1e-5.
        np.testing.assert_allclose(history["train_loss"], single.history["train_loss"], rtol=1e-5)
        assert history["lr"] == [pytest.approx(run["learning_rate"])]


def test_a_tx_factory_reads_the_config(tiny):
    def factory(config, steps_per_epoch):
        schedule = optax.cosine_decay_schedule(config.learning_rate, config.epochs * steps_per_epoch)
        return optax.inject_hyperparams(optax.sgd)(learning_rate=schedule, momentum=0.9)

    result = fit(CFG.replace(learning_rate=0.05), tiny, model=TinyCNN(), tx=factory, progress=False)
    assert result.history["lr"][0] < 0.05 and result.history["lr"][1] < result.history["lr"][0]


@pytest.mark.parametrize("pieces, config, match", [
    ({"model": TinyCNN}, {}, "pass TinyCNN"),
    ({"model": NoTrainArg()}, {}, "must take `train: bool`"),
    ({"model": NoDropoutArg()}, {"dropout_rate": 0.3}, "add `dropout_rate=None`"),
    ({"model": TinyCNN(num_classes=100)}, {}, r"logits \[N, 10\]"),
    ({"model": TinyCNN()}, {"model_kwargs": {"dense": [8]}}, "drop model_kwargs"),
    ({"tx": optax.adamw(1e-3)}, {"grad_clip_norm": 1.0}, "would be ignored"),
    ({"tx": "adam"}, {}, "GradientTransformation or a factory"),
    ({"loss_fn": cross_entropy}, {"label_smoothing": 0.1}, "drop label_smoothing"),
    ({"loss_fn": lambda logits, labels: cross_entropy(logits, labels).mean()}, {}, "per-example"),
    ({"metrics_fn": lambda logits, labels: {"top1": (logits.argmax(-1) == labels).mean()}}, {}, "per-example"),
    ({"metrics_fn": lambda logits, labels: {"loss": logits[:, 0]}}, {}, "rename it"),
])
def test_pieces_that_break_the_protocol_fail_naming_the_fix(tiny, pieces, config, match):
    with pytest.raises(ConfigError, match=match):
        fit(CFG.replace(epochs=1, **config), tiny, progress=False, **pieces)


@pytest.mark.parametrize("tx, match", [
    (optax.adamw(1e-3), "inject_hyperparams"),
    (optax.inject_hyperparams(optax.adamw)(learning_rate=optax.cosine_decay_schedule(1e-3, 10)), "is a schedule"),
])
def test_a_learning_rate_axis_needs_an_injected_number(tiny, tx, match):
    with pytest.raises(ConfigError, match=match):
        fit(CFG.replace(epochs=1), tiny, runs=[{"learning_rate": 1e-3}, {"learning_rate": 1e-2}], model=TinyCNN(),
            tx=tx, progress=False)


def test_a_changed_module_or_optimizer_gets_a_new_program(tiny):
    """The program cache keys on the module's class and fields and on the optimizer object."""
    first = fit(CFG.replace(epochs=1), tiny, model=TinyCNN(features=8), progress=False)
    second = fit(CFG.replace(epochs=1), tiny, model=TinyCNN(features=16), progress=False)
    assert first.state.params["Conv_0"]["kernel"].shape[-1] == 8
    assert second.state.params["Conv_0"]["kernel"].shape[-1] == 16
    slow = fit(CFG.replace(epochs=1), tiny, model=TinyCNN(), tx=optax.sgd(1e-6), progress=False)
    fast = fit(CFG.replace(epochs=1), tiny, model=TinyCNN(), tx=optax.adam(1e-2), progress=False)
    assert fast.history["train_loss"] != slow.history["train_loss"]


def test_registered_model_and_augmentation_work_by_name_and_in_checkpoints(tiny, tmp_path):
    @register_model("research_tiny")
    def research_tiny(num_classes, dtype):
        return TinyCNN(features=4, num_classes=num_classes)

    @register_augmentation("invert")
    def invert(key, images):
        return 255 - images

    cfg = CFG.replace(epochs=1, model="research_tiny", augment=("flip", "invert"))
    result = fit(cfg, tiny, checkpoint_dir=str(tmp_path), progress=False)
    assert result.state.params["Conv_0"]["kernel"].shape[-1] == 4
    assert load_trained(tmp_path).predict(tiny.test.images[:4]).shape == (4,)


def test_a_function_in_augment_is_applied(tiny):
    seen = []

    def blackout(key, images):
        seen.append(images.shape)
        return jnp.zeros_like(images)

    result = fit(CFG.replace(epochs=1, augment=(blackout,)), tiny, progress=False)
    assert seen  # traced into the step
    assert result.summary["test_accuracy"] < 0.25  # nothing to learn from black images
    augment, mix = make_pipeline(["flip", blackout])
    assert mix is None and not augment(jax.random.key(0), tiny.train.images[:4]).any()
    with pytest.raises(ConfigError, match="put mixup/cutmix last"):
        make_pipeline(["mixup", "flip"])


@pytest.mark.parametrize("op", [mixup, cutmix])
def test_mixes_blend_targets_exactly_as_they_blend_the_images(op):
    """Image i is filled with the value i and its target is class i: after mixing, each image's mean value is
    the mean class of its soft target (a pixel from image j counts j, a target weight on class j counts j)."""
    n = 16
    images = jnp.broadcast_to(jnp.arange(n, dtype=jnp.float32)[:, None, None, None], (n, 32, 32, 3))
    targets = jax.nn.one_hot(jnp.arange(n), n)
    mixed, soft = jax.jit(op)(jax.random.key(3), images, targets)
    assert mixed.shape == images.shape and soft.shape == targets.shape
    # Two weights lambda and 1 - lambda summed in float32: one rounding of 1 (6e-8).
    np.testing.assert_allclose(soft.sum(-1), 1.0, rtol=4 * F32)
    assert float(soft.max(-1).min()) < 1.0  # mixed
    # Means of 3072 float32 values up to 15 (random-rounding estimate sqrt(3072) u ~ 3e-6 relative): 1e-5.
    np.testing.assert_allclose(mixed.mean((1, 2, 3)), soft @ jnp.arange(n, dtype=jnp.float32), rtol=1e-5)
    same, same_targets = op(jax.random.key(3), images, targets, p=0.0)
    np.testing.assert_array_equal(same, images)
    np.testing.assert_array_equal(same_targets, targets)


def test_ema_follows_the_formula_and_is_evaluated_beside_the_weights(tiny, tmp_path):
    cfg = CFG.replace(ema_decay=0.9)
    result = fit(cfg, tiny, checkpoint_dir=str(tmp_path), progress=False)
    assert len(result.history["val_accuracy_ema"]) == 2 and "test_accuracy_ema" in result.summary
    assert result.history["val_accuracy_ema"] != result.history["val_accuracy"]
    # one step by hand: d = min(0.9, (1 + 0) / (10 + 0)) = 0.1 after the first step
    fns = result.fns
    state = fns.fresh_state(0, {"learning_rate": 0.01, "weight_decay": 0.0}, 0.0)
    batch = (jnp.asarray(tiny.train.images[:32]), jnp.asarray(tiny.train.labels[:32].astype(np.int32)))
    after, _ = jax.jit(fns.train_step)(state, batch, jax.random.key(0))
    expect = jax.tree.map(lambda a, b: 0.1 * a + 0.9 * b, state.params, after.params)
    # 0.1 a + 0.9 b in float32 either way: two roundings of each term (relative 2.4e-7); atol for exact zeros.
    chex.assert_trees_all_close(after.ema["params"], expect, rtol=4 * F32, atol=1e-9)
    averaged = load_trained(tmp_path, "latest", ema=True)
    chex.assert_trees_all_close(averaged.variables, jax.device_get(result.state.ema))
    with pytest.raises(ValueError, match="ema_decay"):
        result.state.replace(ema=()).weights("ema")


def _scalars(directory) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in a directory's TensorBoard event files (TFRecord framing of ``Event`` protos)."""
    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        i = 0
        while i < len(data):
            (length,) = struct.unpack("<Q", data[i:i + 8])
            event = Event.FromString(data[i + 12:i + 12 + length])
            i += 12 + length + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_callbacks_tensorboard_and_profile(tiny, tmp_path):
    class Recorder(Callback):
        def __init__(self):
            self.events = []

        def on_interval(self, event):
            self.events.append(("interval", event.step, event.runs, int(np.max(event.state.step))))

        def on_epoch(self, event):
            self.events.append(("epoch", event.step, event.runs, event.metrics[0]["val_accuracy"]))

    recorder = Recorder()
    runs = [{"seed": 0}, {"seed": 1}]
    result = fit(CFG, tiny, runs=runs, log_dir=str(tmp_path), tensorboard=True, progress=False,
                 callbacks=[recorder, ProfileTrace(tmp_path / "trace", start_step=4, num_steps=8)])
    intervals = [e for e in recorder.events if e[0] == "interval"]
    assert [e[1] for e in intervals] == result.history["interval"]["step"]
    assert all(state_step >= step and e_runs == [0, 1] for _, step, e_runs, state_step in intervals)
    epochs = [e for e in recorder.events if e[0] == "epoch"]
    assert [e[3] for e in epochs] == result.histories[0]["val_accuracy"]
    for run, history in enumerate(result.histories):
        scalars = _scalars(tmp_path / "tensorboard" / f"run_{run:03d}")
        assert [v for _, v in scalars["epoch/val_accuracy"]] == pytest.approx(history["val_accuracy"])
        assert [s for s, _ in scalars["interval/loss"]] == history["interval"]["step"]
        assert [v for _, v in scalars["epoch/lr"]] == pytest.approx(history["lr"])
    assert list((tmp_path / "trace").rglob("*.xplane.pb"))


def test_command_line_imports_a_module_that_registers_a_model(tmp_path, monkeypatch):
    from jaxcifar.cli import common_parser, overridden, parse

    (tmp_path / "my_research_models.py").write_text(
        "from jaxcifar.models import ConvNet, register_model\n"
        "register_model('my_convnet')(ConvNet)\n")
    monkeypatch.chdir(tmp_path)
    parser = common_parser("test", epochs=1, batch_size=32, out=str(tmp_path))
    args = parse(parser, ["--import", "my_research_models", "--set", "model=my_convnet"])
    assert overridden(TrainConfig(), args).model == "my_convnet"
    with pytest.raises(ConfigError, match="importable module"):
        parse(parser, ["--import", "no_such_module_here"])
