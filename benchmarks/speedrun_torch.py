"""An independent PyTorch (eager) implementation of ``jaxcifar.configs.speedrun``, to check that the JAX
recipe's accuracy on a given copy of CIFAR-10 is what the recipe gives there, not an artefact of our code.

    python benchmarks/speedrun_torch.py --data ../shared/data/cifar10_jpeg.zip [--epochs 10] [--seed 0]

Same net, initialization, whitening, optimizer groups (summed loss, lr 11.5 and decay 0.0153 per 1024
examples, 64x batch-norm bias lr), triangular schedule, lookahead (weights and batch-norm buffers), random
flip + 2-pixel reflect translation and mirror/shift test-time augmentation. Needs ``torch`` (not a jaxcifar
dependency). Prints per-epoch training accuracy and test accuracy at TTA levels 0, 1, 2.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from jaxcifar.data.sources import load_cifar

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


class BatchNorm(nn.BatchNorm2d):
    def __init__(self, channels: int):
        super().__init__(channels, momentum=0.4, eps=1e-12)  # running = 0.6 * running + 0.4 * batch
        self.weight.requires_grad = False  # no scale


class Conv(nn.Conv2d):
    """3x3 same-padded, bias-free; the first ``in`` filters start as identities."""

    def __init__(self, cin: int, cout: int):
        super().__init__(cin, cout, 3, padding="same", bias=False)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        torch.nn.init.dirac_(self.weight.data[:self.weight.size(1)])


def block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(Conv(cin, cout), nn.MaxPool2d(2), BatchNorm(cout), nn.GELU(), Conv(cout, cout),
                         BatchNorm(cout), nn.GELU())


def make_net(train_x: torch.Tensor) -> nn.Sequential:
    whiten = nn.Conv2d(3, 24, 2, padding=0, bias=True)
    with torch.no_grad():  # eigenvectors of the uncentred 2x2-patch covariance, scaled, and their negatives
        p = train_x[:5000].unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 12).double()
        values, vectors = torch.linalg.eigh(p.T @ p / len(p))
        scaled = (vectors.T.flip(0) / torch.sqrt(values.flip(0) + 5e-4)[:, None]).reshape(12, 3, 2, 2)
        whiten.weight.copy_(torch.cat([scaled, -scaled]).float())
    whiten.weight.requires_grad = False
    head = nn.Linear(256, 10, bias=False)
    return nn.Sequential(whiten, nn.GELU(), block(24, 64), block(64, 256), block(256, 256), nn.MaxPool2d(3),
                         nn.Flatten(), head)


def to_tensor(images: np.ndarray, device: str) -> torch.Tensor:
    x = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(MEAN, device=device).view(1, 3, 1, 1)) / torch.tensor(STD, device=device).view(1, 3, 1, 1)
    return x.contiguous(memory_format=torch.channels_last)


def flip_translate(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    n = len(x)
    padded = F.pad(x, (2,) * 4, mode="reflect")
    dy, dx = (torch.randint(0, 5, (n,), generator=gen, device=x.device) for _ in range(2))
    out = torch.empty_like(x)
    for i in range(5):
        for j in range(5):
            m = (dy == i) & (dx == j)
            out[m] = padded[m, :, i:i + 32, j:j + 32]
    flip = torch.rand(n, generator=gen, device=x.device) < 0.5
    out[flip] = out[flip].flip(-1)
    return out.contiguous(memory_format=torch.channels_last)


def logits(net: nn.Module, x: torch.Tensor, level: int) -> torch.Tensor:
    out = net(x) / 9
    if level == 0:
        return out
    mirror = 0.5 * (out + net(x.flip(-1)) / 9)
    if level == 1:
        return mirror
    padded = F.pad(x, (1,) * 4, mode="reflect")
    shifted = [padded[:, :, :32, :32], padded[:, :, 2:, 2:]]
    return 0.5 * mirror + 0.25 * sum(0.5 * (net(s) + net(s.flip(-1))) / 9 for s in shifted)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="CIFAR-10 ImageFolder directory or zip")
    p.add_argument("--epochs", type=float, default=10)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(a.seed)
    gen = torch.Generator(device=device).manual_seed(a.seed)
    ds = load_cifar("cifar10", a.data, progress=False)
    train_x, test_x = to_tensor(ds.train.images, device), to_tensor(ds.test.images, device)
    train_y = torch.from_numpy(ds.train.labels).long().to(device)
    test_y = torch.from_numpy(ds.test.labels).long().to(device)
    net = make_net(train_x).to(device, memory_format=torch.channels_last)

    batch, momentum = 1024, 0.85
    steps_per_epoch = len(train_x) // batch
    total = math.ceil(a.epochs * steps_per_epoch)
    kilo = batch * (1 + 1 / (1 - momentum))
    lr, decay = 11.5 / kilo, 0.0153 * batch / kilo
    bn_biases = [m.bias for m in net.modules() if isinstance(m, BatchNorm)]
    others = [q for q in net.parameters() if q.requires_grad and all(q is not b for b in bn_biases)]
    opt = torch.optim.SGD([dict(params=bn_biases, lr=64 * lr, weight_decay=decay / (64 * lr)),
                           dict(params=others, lr=lr, weight_decay=decay / lr)], momentum=momentum, nesterov=True)
    initial = [g["lr"] for g in opt.param_groups]
    schedule = np.interp(np.arange(total + 1), [0, int(0.23 * total), total], [0.2, 1.0, 0.07])
    alpha = 0.95 ** 5 * (np.arange(total + 1) / total) ** 3
    slow = {k: v.clone() for k, v in net.state_dict().items()}

    def lookahead(d: float) -> None:
        with torch.no_grad():
            for s, v in zip(slow.values(), net.state_dict().values(), strict=True):
                if v.dtype == torch.float:
                    s.lerp_(v, 1 - d)
                    v.copy_(s)

    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.2, reduction="none")
    step, start = 0, time.perf_counter()
    net.train()
    while step < total:
        order = torch.randperm(len(train_x), generator=gen, device=device)
        correct = 0
        for b in range(min(steps_per_epoch, total - step)):
            idx = order[b * batch:(b + 1) * batch]
            out = net(flip_translate(train_x[idx], gen)) / 9
            loss = loss_fn(out, train_y[idx]).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if step >= 3 * steps_per_epoch:
                net[0].bias.grad = None  # the whitening bias trains for 3 epochs
            for g, lr0 in zip(opt.param_groups, initial, strict=True):
                g["lr"] = lr0 * schedule[step]
            opt.step()
            correct += (out.argmax(1) == train_y[idx]).sum().item()
            step += 1
            if step % 5 == 0:
                lookahead(alpha[step])
        print(f"step {step}/{total}: train accuracy {correct / ((b + 1) * batch):.4f}, "
              f"{time.perf_counter() - start:.0f} s", flush=True)
    lookahead(1.0)  # end on the slow weights
    net.eval()
    with torch.no_grad():
        for level in (0, 1, 2):
            out = torch.cat([logits(net, test_x[i:i + 1000], level) for i in range(0, len(test_x), 1000)])
            print(f"TTA {level}: test accuracy {(out.argmax(1) == test_y).float().mean().item():.4f}")


if __name__ == "__main__":
    main()
