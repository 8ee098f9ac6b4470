"""Flax ``linen`` models for CIFAR: MLP, the classic ConvNet, ResNets (18 with a CIFAR stem, 20, 56) and the
speedrun net (airbench class).

Every model maps float NHWC images [N, 32, 32, 3] to logits [N, num_classes] (softmax lives in the loss),
takes ``train`` (dropout and batch-norm mode) and an optional traced ``dropout_rate`` that overrides the
configured one, so a sweep can ``vmap`` over rates. The classifier is always the submodule ``head``, so a
body trained on CIFAR-10 can be loaded under a new CIFAR-100 head.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcifar.errors import ConfigError
from jaxcifar.layers import BatchNorm, Conv, max_pool_2x2

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    "gelu": nn.gelu,  # tanh approximation (jax's default)
    "gelu_exact": functools.partial(nn.gelu, approximate=False),  # the erf form, PyTorch's default GELU
    "leaky_relu": nn.leaky_relu,
    "silu": nn.silu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    if name not in ACTIVATIONS:
        raise ConfigError(f"unknown activation {name!r}: use one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class Dropout(nn.Module):
    """Inverted dropout whose rate may be a traced value (``nn.Dropout`` needs a static rate).
    ``broadcast_dims`` share one draw along those axes: ``(1, 2)`` on NHWC drops whole channels (PyTorch's
    ``Dropout2d``)."""

    broadcast_dims: Sequence[int] = ()

    @nn.compact
    def __call__(self, x: jax.Array, rate: float | jax.Array, train: bool) -> jax.Array:
        if not train or (isinstance(rate, int | float) and rate == 0.0):
            return x
        keep = 1.0 - jnp.asarray(rate, jnp.float32)
        shape = tuple(1 if i in self.broadcast_dims else n for i, n in enumerate(x.shape))
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
        return jnp.where(mask, x / keep.astype(x.dtype), jnp.zeros((), x.dtype))


def torch_uniform(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    """PyTorch's default conv/linear init: uniform in +-1/sqrt(fan_in) (fan_in = all axes but the last)."""
    fan_in = math.prod(shape[:-1])
    return jax.random.uniform(key, shape, dtype, -1.0 / math.sqrt(fan_in), 1.0 / math.sqrt(fan_in))


def torch_bias(fan_in: int) -> Callable[..., jax.Array]:
    """PyTorch's default bias init for a layer with ``fan_in`` inputs: uniform in +-1/sqrt(fan_in) (a Flax
    bias initializer sees only the bias's own shape, so the fan-in is bound here)."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


INITS = ("flax", "torch")


def layer_init(init: str, fan_in: int) -> dict[str, Any]:
    """Initializer fields for a Conv/Dense with ``fan_in`` inputs: ``{}`` keeps Flax's defaults (lecun-normal
    kernel, zero bias); ``"torch"`` gives PyTorch's defaults (kernel and bias uniform in +-1/sqrt(fan_in)),
    which the reference reports trained with."""
    if init not in INITS:
        raise ConfigError(f"unknown init {init!r}: use one of {list(INITS)}")
    if init == "flax":
        return {}
    return {"kernel_init": torch_uniform, "bias_init": torch_bias(fan_in)}


class MLP(nn.Module):
    """Flatten -> Dense(h) + activation (+ dropout) for each hidden size -> Dense(num_classes)."""

    num_classes: int = 10
    hidden: Sequence[int] = (4096, 4096)
    activation: str = "relu"
    dropout_rate: float = 0.0
    weight_init: str = "flax"  # "torch": PyTorch's default initialization (see layer_init)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, dropout_rate=None):
        act = activation(self.activation)
        rate = self.dropout_rate if dropout_rate is None else dropout_rate
        x = x.reshape(x.shape[0], -1).astype(self.dtype)
        for i, h in enumerate(self.hidden):
            x = act(nn.Dense(h, dtype=self.dtype, name=f"dense{i}", **layer_init(self.weight_init, x.shape[-1]))(x))
            x = Dropout(name=f"drop{i}")(x, rate, train)
        head = nn.Dense(self.num_classes, dtype=self.dtype, name="head", **layer_init(self.weight_init, x.shape[-1]))
        return head(x).astype(jnp.float32)


class ConvNet(nn.Module):
    """The classic CIFAR assignment net: conv32-conv32-pool-conv64-conv64-pool-dense512-dense(classes), and
    its relatives in the reference reports (see :mod:`jaxcifar.configs`).

    ``channels`` groups convolutions into blocks, each followed by 2x2 max-pooling; ``kernel_size`` is one
    size for every conv or one per block. ``batch_norm`` is ``True`` (after every conv), ``False``, or the
    indices of the convs it follows, counted from 0 over all blocks; ``norm_after_activation`` puts it after
    the activation (conv-act-BN) instead of before. ``dropout_at`` picks where dropout applies: ``"blocks"``
    (after each pooled block; ``channel_dropout`` drops whole channels there, as PyTorch's ``Dropout2d``),
    ``"head"`` (after each hidden dense layer, so before the classifier) or both.
    """

    num_classes: int = 10
    channels: Sequence[Sequence[int]] = ((32, 32), (64, 64))
    kernel_size: int | Sequence[int] = 3
    padding: str = "VALID"
    dense: Sequence[int] = (512,)
    batch_norm: bool | Sequence[int] = False
    norm_after_activation: bool = False
    activation: str = "relu"
    dropout_rate: float = 0.0
    dropout_at: Sequence[str] = ("head",)
    channel_dropout: bool = False
    weight_init: str = "flax"  # "torch": PyTorch's default initialization (see layer_init)
    dtype: Any = jnp.float32

    def _kernel(self, block: int) -> tuple[int, int]:
        size = self.kernel_size if isinstance(self.kernel_size, int) else self.kernel_size[block]
        return size, size

    def _normalized(self, conv: int) -> bool:
        """Whether conv number ``conv`` (counted over all blocks) is followed by batch norm."""
        if isinstance(self.batch_norm, bool):
            return self.batch_norm
        return conv in self.batch_norm

    def _check_fields(self) -> None:
        unknown = set(self.dropout_at) - {"blocks", "head"}
        if unknown:
            raise ConfigError(f"unknown dropout position(s) {sorted(unknown)}: use 'blocks' and/or 'head'")
        convs = sum(len(block) for block in self.channels)
        if not isinstance(self.batch_norm, bool) and not set(self.batch_norm) <= set(range(convs)):
            raise ConfigError(f"batch_norm {tuple(self.batch_norm)} names convs outside 0..{convs - 1} (counted "
                              "over all blocks): pick from those, or True for all")
        if not isinstance(self.kernel_size, int) and len(self.kernel_size) != len(self.channels):
            raise ConfigError(f"kernel_size {tuple(self.kernel_size)} needs one size per block "
                              f"({len(self.channels)} blocks) or a single int")

    @nn.compact
    def __call__(self, x, train: bool = False, dropout_rate=None):
        self._check_fields()
        act = activation(self.activation)
        rate = self.dropout_rate if dropout_rate is None else dropout_rate
        x = x.astype(self.dtype)
        conv = 0
        for b, block in enumerate(self.channels):
            k = self._kernel(b)
            for c, width in enumerate(block):
                norm = self._normalized(conv)
                init = layer_init(self.weight_init, k[0] * k[1] * x.shape[-1])
                # A bias right before batch norm is cancelled by its mean: leave it out there.
                x = Conv(width, k, padding=self.padding, use_bias=not norm or self.norm_after_activation,
                         dtype=self.dtype, name=f"conv{b}_{c}", **init)(x)
                bn = BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype, name=f"bn{b}_{c}")
                if norm and not self.norm_after_activation:
                    x = bn(x)
                x = act(x)
                if norm and self.norm_after_activation:
                    x = bn(x)
                conv += 1
            x = max_pool_2x2(x)
            if "blocks" in self.dropout_at:
                dims = (1, 2) if self.channel_dropout else ()
                x = Dropout(broadcast_dims=dims, name=f"drop_block{b}")(x, rate, train)
        x = x.reshape(x.shape[0], -1)
        for i, width in enumerate(self.dense):
            x = act(nn.Dense(width, dtype=self.dtype, name=f"dense{i}", **layer_init(self.weight_init, x.shape[-1]))(x))
            if "head" in self.dropout_at:
                x = Dropout(name=f"drop_dense{i}")(x, rate, train)
        head = nn.Dense(self.num_classes, dtype=self.dtype, name="head", **layer_init(self.weight_init, x.shape[-1]))
        return head(x).astype(jnp.float32)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection (1x1 conv-BN projection when the shape changes)."""

    width: int
    stride: int = 1
    activation: str = "relu"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        act = activation(self.activation)
        norm = lambda name: BatchNorm(use_running_average=not train, momentum=0.9,  # noqa: E731
                                         dtype=self.dtype, name=name)
        y = Conv(self.width, (3, 3), self.stride, padding=1, use_bias=False, dtype=self.dtype, name="conv1")(x)
        y = act(norm("bn1")(y))
        y = Conv(self.width, (3, 3), padding=1, use_bias=False, dtype=self.dtype, name="conv2")(y)
        y = norm("bn2")(y)
        if self.stride != 1 or x.shape[-1] != self.width:
            x = Conv(self.width, (1, 1), self.stride, use_bias=False, dtype=self.dtype, name="proj")(x)
            x = norm("proj_bn")(x)
        return act(x + y)


class ResNet(nn.Module):
    """ResNet with a CIFAR stem (one 3x3 conv, no max-pool). ``stages`` lists (blocks, width) per stage;
    every stage after the first halves the resolution. Global average pooling, optional dropout, head."""

    num_classes: int = 10
    stages: Sequence[tuple[int, int]] = ((2, 64), (2, 128), (2, 256), (2, 512))
    activation: str = "relu"
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, dropout_rate=None):
        rate = self.dropout_rate if dropout_rate is None else dropout_rate
        x = x.astype(self.dtype)
        x = Conv(self.stages[0][1], (3, 3), padding=1, use_bias=False, dtype=self.dtype, name="stem")(x)
        x = BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype, name="stem_bn")(x)
        x = activation(self.activation)(x)
        for s, (blocks, width) in enumerate(self.stages):
            for b in range(blocks):
                stride = 2 if s > 0 and b == 0 else 1
                x = BasicBlock(width, stride, self.activation, self.dtype, name=f"stage{s}_block{b}")(x, train)
        x = x.mean(axis=(1, 2))
        x = Dropout(name="drop")(x, rate, train)
        return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x).astype(jnp.float32)


def partial_identity(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    """HWIO conv kernel from :func:`torch_uniform` whose first ``min(I, O)`` output channels are replaced by
    the identity (a centred 1 on their own input channel): a fresh conv starts by passing its input on."""
    kh, kw, cin, cout = shape
    n = min(cin, cout)
    eye = jnp.zeros((kh, kw, cin, n), dtype).at[kh // 2, kw // 2, :n, :n].set(jnp.eye(n, dtype=dtype))
    return torch_uniform(key, shape, dtype).at[..., :n].set(eye)


def patch_whitening_kernel(images: jax.Array, size: int = 2, eps: float = 5e-4) -> jax.Array:
    """HWIO kernel float32 [size, size, C, 2 * size * size * C] that whitens ``size`` x ``size`` patches of
    ``images`` (float [N, H, W, C], normalized): the eigenvectors of the (uncentred) patch covariance scaled by
    1/sqrt(eigenvalue + eps), largest first, followed by their negatives."""
    n, h, w, c = images.shape
    x = images.astype(jnp.float32)
    patches = jnp.concatenate([x[:, i:h - size + 1 + i, j:w - size + 1 + j] for i in range(size)
                               for j in range(size)], axis=-1)  # [N, h', w', size*size*C], (i, j, c) order
    flat = patches.reshape(-1, size * size * c)
    eigenvalues, eigenvectors = jnp.linalg.eigh(flat.T @ flat / flat.shape[0])
    scaled = eigenvectors[:, ::-1] / jnp.sqrt(eigenvalues[::-1] + eps)
    return jnp.concatenate([scaled, -scaled], axis=1).reshape(size, size, c, -1)


class SpeedrunNet(nn.Module):
    """The airbench class of fast CIFAR-10 net: a frozen 2x2 patch-whitening conv (trainable bias), GELU,
    then per width a block conv3x3-maxpool-BN-GELU-conv3x3-BN-GELU (widths 64/256/256; 31 -> 15 -> 7 -> 3),
    global max-pooling and a bias-free classifier scaled by ``logit_scale``. Batch norm has no scale and a fast
    running average that keeps 0.6 of the old statistics per step (airbench's ``batchnorm_momentum=0.6``,
    PyTorch ``momentum=0.4``); convs start as partial identities.
    ``init_from_data`` sets the whitening kernel from training images (``fit`` calls it)."""

    num_classes: int = 10
    widths: Sequence[int] = (64, 256, 256)
    whiten_size: int = 2
    bn_momentum: float = 0.6
    bn_epsilon: float = 1e-12
    logit_scale: float = 1 / 9
    activation: str = "gelu"
    dropout_rate: float = 0.0  # before the classifier; the recipe uses none
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, dropout_rate=None):
        act = activation(self.activation)
        rate = self.dropout_rate if dropout_rate is None else dropout_rate
        k = self.whiten_size
        x = act(Conv(2 * k * k * x.shape[-1], (k, k), use_bias=True, dtype=self.dtype, name="whiten")(x))
        for b, width in enumerate(self.widths):
            for c in range(2):
                x = Conv(width, (3, 3), padding="SAME", use_bias=False, dtype=self.dtype,
                         kernel_init=partial_identity, name=f"block{b}_conv{c}")(x)
                if c == 0:
                    x = max_pool_2x2(x)
                x = act(BatchNorm(use_running_average=not train, momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                                  use_scale=False, dtype=self.dtype, name=f"block{b}_bn{c}")(x))
        x = Dropout(name="drop")(x.max(axis=(1, 2)), rate, train)
        head = nn.Dense(self.num_classes, use_bias=False, dtype=self.dtype, kernel_init=torch_uniform, name="head")
        return (head(x) * self.logit_scale).astype(jnp.float32)

    def init_from_data(self, params: dict[str, Any], images: jax.Array) -> dict[str, Any]:
        """``params`` with the whitening kernel computed from normalized training images float [N, 32, 32, 3]."""
        kernel = patch_whitening_kernel(images, self.whiten_size)
        return {**params, "whiten": {**params["whiten"], "kernel": kernel}}


def resnet18(**kw) -> ResNet:
    return ResNet(stages=((2, 64), (2, 128), (2, 256), (2, 512)), **kw)


def resnet20(**kw) -> ResNet:
    return ResNet(stages=((3, 16), (3, 32), (3, 64)), **kw)


def resnet56(**kw) -> ResNet:
    return ResNet(stages=((9, 16), (9, 32), (9, 64)), **kw)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "convnet": ConvNet,
    "resnet18": resnet18,
    "resnet20": resnet20,
    "resnet56": resnet56,
    "speedrun": SpeedrunNet,
}
BUILTIN_MODELS = {**MODELS}  # the ones shipped here (checked by the tests); others are checked when built
TORCH_INIT_MODELS = ("mlp", "convnet")  # the models with a ``weight_init`` field (TrainConfig.init)


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: make a model class (or a factory function) usable by name in ``TrainConfig.model``, from the
    command line (``--set model=NAME``) and in checkpoints (``load_trained`` rebuilds it by name in a process
    that registered it). It is called as ``factory(num_classes=..., dtype=..., **config.model_kwargs)`` and
    must return a module following the protocol of :mod:`jaxcifar.train.components`. Registering a name
    again replaces it (and compiled programs of the old one are not reused)."""
    def register(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        MODELS[name] = factory
        return factory

    return register


def create_model(name: str, num_classes: int, dtype: Any = jnp.float32, **kwargs) -> nn.Module:
    """Build a registered model by name; ``kwargs`` are its fields (e.g. ``batch_norm=True``)."""
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}: use one of {sorted(MODELS)}")
    if "activation" in kwargs:
        activation(kwargs["activation"])
    try:
        return MODELS[name](num_classes=num_classes, dtype=dtype, **kwargs)
    except TypeError as e:
        raise ConfigError(f"bad option for model {name!r}: {e}") from e
