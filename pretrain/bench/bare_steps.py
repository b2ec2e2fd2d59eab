"""Bare PyTorch training steps, each written as its method's official code trains, for ``bench ops``
to count against vitscale's step on the same maths.

Each ``bare_*_run(cfg, dist)`` reads the hyper-parameters of a row's resolved vitscale config (so
both loops train the same model with the same losses), builds its networks, optimizer and inputs,
and returns a :class:`BareLoop`. What the data loader hands the official code (crops already
augmented and normalized, masks and their indices) is made before the loop, as the loader makes it
outside the step. All of them: fp32 weights, autocast bf16, fused AdamW, ``zero_grad(set_to_none=
True)``, the backbone built by vitscale's ``create_backbone`` (the same timm model and attention
path), no host sync (the loss is never read; schedules are Python floats, the lr constant). With
``engine.compile`` the trained backbone (or the function that runs it with a mask) is compiled with
``dynamic=False``, as ``engine.compile`` compiles vitscale's.

The official losses are functions of their own here, so that a test can hold them to vitscale's.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.data.transforms import normalize
from pretrain.models.backbone import create_backbone
from pretrain.models.heads import DINOHead
from pretrain.models.masked import MaskToken
from pretrain.schedules import cosine


@dataclass
class BareLoop:
    """``loop(mark)`` takes ``steps`` optimizer steps, ``mark()`` called at the start of each, and
    returns their losses (unread: no sync); ``trained`` are the parameters the optimizer steps, by name."""

    steps: int
    step: Callable[[int], torch.Tensor]
    trained: dict[str, nn.Parameter]

    def __call__(self, mark: Callable[[], None]) -> list[torch.Tensor]:
        losses = []
        for i in range(self.steps):
            mark()
            losses.append(self.step(i))
        return losses


def _compiled(fn, cfg):
    """``fn`` (a module, compiled in place, or a function) as ``engine.compile`` would run it."""
    if not cfg.engine.compile:
        return fn
    if isinstance(fn, nn.Module):
        fn.compile(dynamic=False)
        return fn
    return torch.compile(fn, dynamic=False)


def _adamw(groups, cfg) -> torch.optim.AdamW:
    o = cfg.optim
    return torch.optim.AdamW(groups, lr=o.lr, weight_decay=o.weight_decay, betas=o.betas, eps=o.eps, fused=True)


def _decay_groups(named: dict[str, nn.Parameter], exempt: Callable[[str, torch.Tensor], bool]) -> list[dict]:
    """The two groups the official recipes build: decayed, and exempt (weight decay 0)."""
    return [{"params": [p for n, p in named.items() if not exempt(n, p)]},
            {"params": [p for n, p in named.items() if exempt(n, p)], "weight_decay": 0.0}]


def _trainable(module: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


def _ema(teacher: list[torch.Tensor], student: list[torch.Tensor], momentum: float) -> None:
    with torch.no_grad():
        torch._foreach_mul_(teacher, momentum)
        torch._foreach_add_(teacher, student, alpha=1 - momentum)


def _momentum_copy(student: nn.Module, make: Callable[[], nn.Module]) -> nn.Module:
    """A frozen copy of ``student``'s modules that ``make()`` builds (a teacher without the
    student-only heads)."""
    teacher = make()
    teacher.load_state_dict(student.state_dict(), strict=False)
    return teacher.requires_grad_(False)


def _crops(size: int, count: int, dist) -> torch.Tensor:
    """``count`` crops of ``size`` px as the official loaders hand them: augmented, normalized floats."""
    return torch.randn(count, 3, size, size, device=dist.device)


def _patch_size(backbone: nn.Module) -> int:
    patch = backbone.patch_embed.patch_size
    return patch[0] if isinstance(patch, (tuple, list)) else patch


# -- the official losses -------------------------------------------------------------------------------------
def moby_contrastive_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """Transformer-SSL's ``MoBY.contrastive_loss``: query ``q`` (N x C) against its key ``k`` and a
    queue (C x K) of negatives."""
    l_pos = torch.einsum("nc,nc->n", [q, k]).unsqueeze(-1)
    l_neg = torch.einsum("nc,ck->nk", [q, queue.clone().detach()])
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, labels)


@torch.no_grad()
def sinkhorn_knopp_teacher(teacher_output: torch.Tensor, teacher_temp: float, samples,
                           iterations: int = 3) -> torch.Tensor:
    """DINOv2's ``SinkhornKnopp.sinkhorn_knopp_teacher`` on one process; ``samples``: the rows (B),
    or for the patches the masked patches' count (a tensor, as the official code passes it)."""
    q = torch.exp(teacher_output.float() / teacher_temp).t()
    prototypes = q.shape[0]
    q /= torch.sum(q)
    for _ in range(iterations):
        q /= torch.sum(q, dim=1, keepdim=True)
        q /= prototypes
        q /= torch.sum(q, dim=0, keepdim=True)
        q /= samples
    q *= samples
    return q.t()


def dinov2_dino_loss(student_outputs: Sequence[torch.Tensor], teacher_ps: Sequence[torch.Tensor],
                     student_temp: float) -> torch.Tensor:
    """DINOv2's ``DINOLoss.forward``: every student chunk against every teacher chunk, summed."""
    total = 0
    for s in student_outputs:
        lsm = F.log_softmax(s.float() / student_temp, dim=-1)
        for t in teacher_ps:
            total -= torch.sum(t * lsm, dim=-1).mean()
    return total


def dinov2_class_loss(student_out: torch.Tensor, teacher_p: torch.Tensor, local_crops: int,
                      student_temp: float) -> torch.Tensor:
    """``SSLMetaArch``'s DINO terms: ``student_out`` (crop-major, the 2 global crops first),
    ``teacher_p`` (2 x B x K) with its crops swapped, so that each global crop meets the other's;
    averaged over the crop pairs."""
    globals_ = teacher_p.shape[0] * teacher_p.shape[1]
    terms = 2 * (2 - 1) + local_crops * 2  # n_global_crops_loss_terms + n_local_crops_loss_terms
    loss = dinov2_dino_loss([student_out[:globals_]], [teacher_p.flatten(0, 1)], student_temp) * 2 / terms
    if local_crops:
        loss = loss + dinov2_dino_loss(student_out[globals_:].chunk(local_crops), teacher_p, student_temp) / terms
    return loss


def ibot_masked_loss(student_patches: torch.Tensor, teacher_p: torch.Tensor, weights: torch.Tensor, images: int,
                     student_temp: float) -> torch.Tensor:
    """DINOv2's ``iBOTPatchLoss.forward_masked``, ``weights`` made by the collate function."""
    loss = torch.sum(teacher_p * F.log_softmax(student_patches.float() / student_temp, dim=-1), dim=-1)
    return -(loss * weights).sum() / images


def koleo(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """DINOv2's ``KoLeoLoss`` (in fp32, as vitscale takes it)."""
    x = F.normalize(x.float(), eps=eps, p=2, dim=-1)
    with torch.no_grad():
        dots = torch.mm(x, x.t())
        dots.view(-1)[:: (len(x) + 1)].fill_(-1)  # the diagonal: a row is not its own neighbour
        _, nearest = torch.max(dots, dim=1)
    return -torch.log(F.pairwise_distance(x, x[nearest], p=2, eps=eps) + eps).mean()


# -- supervised ---------------------------------------------------------------------------------------------
def bare_supervised_run(cfg, dist) -> BareLoop:
    """A timm loop as a user writes it; on several processes gradients are averaged as DDP does."""
    d = cfg.data
    torch.manual_seed(0)
    model = _compiled(create_backbone(cfg.model, d.image_size, d.num_classes).to(dist.device), cfg)
    optimizer = _adamw(model.parameters(), cfg)
    images = torch.randint(0, 256, (d.batch_size, 3, d.image_size, d.image_size), dtype=torch.uint8,
                           device=dist.device)
    labels = torch.randint(0, d.num_classes, (d.batch_size,), device=dist.device)

    def average(param: torch.Tensor) -> None:  # DDP's averaging, one all-reduce per gradient (DDP buckets them)
        dist.all_reduce(param.grad.div_(dist.world_size))

    if dist.world_size > 1:
        for p in model.parameters():
            p.register_post_accumulate_grad_hook(average)

    def step(_: int) -> torch.Tensor:
        with torch.autocast(dist.device.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(model(normalize(images, d.mean, d.std, torch.float32)), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss
    return BareLoop(cfg.train.steps, step, _trainable(model))


# -- DINO ---------------------------------------------------------------------------------------------------
def bare_dino_run(cfg, dist) -> BareLoop:
    """DINO's main_dino.py step: student on every crop, teacher on the globals, DINO's loss, each
    parameter's gradient clipped, the last layer frozen (its first epoch), fused AdamW, a foreach EMA."""
    o, d = cfg.objective, cfg.data
    torch.manual_seed(0)

    def network():
        backbone = create_backbone(cfg.model, d.image_size, 0)
        return nn.ModuleDict({"backbone": backbone, "head": DINOHead(backbone.num_features, o.out_dim, o.hidden_dim,
                                                                     o.bottleneck_dim, o.head_layers,
                                                                     o.norm_last_layer)}).to(dist.device)
    student = network()
    teacher = _momentum_copy(student, network)
    _compiled(student["backbone"], cfg)
    optimizer = _adamw(student.parameters(), cfg)
    center = torch.zeros(1, o.out_dim, device=dist.device)
    globals_ = [_crops(d.image_size, d.batch_size, dist) for _ in range(2)]
    locals_ = [_crops(o.local_size, d.batch_size, dist) for _ in range(o.local_crops)]
    last_layer = [p for n, p in student.named_parameters() if "last_layer" in n]
    student_params, teacher_params = list(student.parameters()), list(teacher.parameters())
    crops = 2 + o.local_crops

    def forward(net, images):
        return torch.cat([net["head"](net["backbone"](c)) for c in images])

    def step(i: int) -> torch.Tensor:
        nonlocal center
        with torch.autocast(dist.device.type, dtype=torch.bfloat16):
            with torch.no_grad():
                teacher_out = forward(teacher, globals_).float()
            student_out = forward(student, globals_ + locals_).float()
        targets = F.softmax((teacher_out - center) / o.teacher_temp, dim=-1).chunk(2)
        preds = F.log_softmax(student_out / o.student_temp, dim=-1).chunk(crops)
        pairs = [(t, p) for a, t in enumerate(targets) for c, p in enumerate(preds) if a != c]  # not a crop with itself
        loss = sum(-(t * p).sum(-1).mean() for t, p in pairs) / len(pairs)
        loss.backward()
        for p in student_params:  # utils.clip_gradients
            if p.grad is not None:
                p.grad.mul_(torch.clamp(cfg.train.clip_grad / (p.grad.norm() + 1e-6), max=1.0))
        for p in last_layer:  # utils.cancel_gradients_last_layer, epoch 0
            p.grad = None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _ema(teacher_params, student_params, cosine(i, cfg.train.steps, o.momentum, 1.0))
        with torch.no_grad():
            center = center * o.center_momentum + teacher_out.mean(0, keepdim=True) * (1 - o.center_momentum)
        return loss
    return BareLoop(cfg.train.steps, step, _trainable(student))


# -- MoBY ---------------------------------------------------------------------------------------------------
def bare_moby_run(cfg, dist) -> BareLoop:
    """Transformer-SSL's MoBY step: two views; online encoder -> projector -> predictor, each query
    L2-normalized; a momentum target encoder and projector (foreach EMA, cosine momentum) keyed on
    the same views; each view's queries against the other view's keys and queue, both directions
    summed; two key queues; the global gradient norm clipped; fused AdamW.

    Differences from the official code that change no value: the queues' write position is a
    Python int (the official ``int(self.queue_ptr)`` reads a tensor, a host sync), and the EMA comes
    after the optimizer step rather than at the start of the next forward. The MLPs' batch norm is
    torch's (the official code's on one process; nn.SyncBatchNorm on several)."""
    o, d = cfg.objective, cfg.data
    torch.manual_seed(0)

    def mlp(in_dim: int) -> nn.Module:  # Transformer-SSL's MoBYMLP, two layers
        return nn.Sequential(nn.Linear(in_dim, o.hidden_dim), nn.BatchNorm1d(o.hidden_dim), nn.ReLU(inplace=True),
                             nn.Linear(o.hidden_dim, o.proj_dim))

    def target_network():
        encoder = create_backbone(cfg.model, d.image_size, 0)
        return nn.ModuleDict({"encoder": encoder, "projector": mlp(encoder.num_features)}).to(dist.device)
    online = target_network()
    online["predictor"] = mlp(o.proj_dim).to(dist.device)
    target = _momentum_copy(online, target_network)
    _compiled(online["encoder"], cfg)
    trained = _trainable(online)
    # The MoBY model lists no exemptions (optim.no_decay [1d] in the recipe): 1-d parameters only.
    optimizer = _adamw(_decay_groups(trained, lambda name, p: p.ndim <= 1), cfg)
    queues = [F.normalize(torch.randn(o.proj_dim, o.queue_size, device=dist.device), dim=0) for _ in range(2)]
    ptr = 0
    views = [_crops(d.image_size, d.batch_size, dist) for _ in range(2)]
    online_params = [p for m in ("encoder", "projector") for p in online[m].parameters()]
    target_params = [p for m in ("encoder", "projector") for p in target[m].parameters()]

    def step(i: int) -> torch.Tensor:
        nonlocal ptr
        with torch.autocast(dist.device.type, dtype=torch.bfloat16):
            q1, q2 = (F.normalize(online["predictor"](online["projector"](online["encoder"](x))).float(), dim=1)
                      for x in views)
            with torch.no_grad():
                k1, k2 = (F.normalize(target["projector"](target["encoder"](x)).float(), dim=1) for x in views)
            loss = moby_contrastive_loss(q1, k2, queues[1], o.temperature) + \
                moby_contrastive_loss(q2, k1, queues[0], o.temperature)
        with torch.no_grad():  # _dequeue_and_enqueue
            queues[0][:, ptr:ptr + len(k1)] = k1.T
            queues[1][:, ptr:ptr + len(k2)] = k2.T
            ptr = (ptr + len(k1)) % o.queue_size
        loss.backward()
        torch.nn.utils.clip_grad_norm_(online.parameters(), cfg.train.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _ema(target_params, online_params, cosine(i, cfg.train.steps, o.momentum, 1.0))
        return loss
    return BareLoop(cfg.train.steps, step, trained)


# -- SimMIM -------------------------------------------------------------------------------------------------
def bare_simmim_run(cfg, dist) -> BareLoop:
    """microsoft/SimMIM's step: the mask drawn with the batch (its MaskGenerator, in the dataset); the
    Swin encoder's patch embeddings mixed with a learned mask token where masked
    (``SwinTransformerForSimMIM``, whose formula is vitscale's MaskToken's), its final feature map
    decoded by a 1x1 convolution and a pixel shuffle, the L1 loss on the masked pixels; the global
    gradient norm clipped; fused AdamW. The uint8 batch is normalized in the step, as vitscale's is."""
    from pretrain.objectives.simmim import random_block_mask  # the distribution the official generator draws

    o, d = cfg.objective, cfg.data
    torch.manual_seed(0)
    encoder = create_backbone(cfg.model, d.image_size, 0)
    patch = _patch_size(encoder)
    stride = encoder.feature_info[-1]["reduction"]
    model = nn.ModuleDict({"encoder": encoder, "mask_token": MaskToken(encoder.patch_embed.proj.out_channels,
                                                                        o.mask_token_init),
                           "decoder": nn.Sequential(nn.Conv2d(encoder.num_features, stride ** 2 * 3, kernel_size=1),
                                                    nn.PixelShuffle(stride))}).to(dist.device)
    trained = _trainable(model)
    listed = encoder.no_weight_decay()  # optim.no_decay [1d, timm]: Swin's tables, and the mask token

    def exempt(name: str, p: torch.Tensor) -> bool:
        return p.ndim <= 1 or name.startswith("mask_token.") or name.removeprefix("encoder.") in listed
    optimizer = _adamw(_decay_groups(trained, exempt), cfg)
    images = torch.randint(0, 256, (d.batch_size, 3, d.image_size, d.image_size), dtype=torch.uint8,
                           device=dist.device)
    masks = [random_block_mask(d.batch_size, d.image_size, o.mask_patch_size, patch, o.mask_ratio, dist.device)
             for _ in range(cfg.train.steps)]

    def encode(x, mask):  # SwinTransformerForSimMIM.forward on timm's Swin (N x H x W x C tokens)
        x = model["mask_token"](encoder.patch_embed(x), mask)
        return encoder.norm(encoder.layers(x)).permute(0, 3, 1, 2)
    encode = _compiled(encode, cfg)

    def step(i: int) -> torch.Tensor:
        x = normalize(images, d.mean, d.std, torch.float32)
        with torch.autocast(dist.device.type, dtype=torch.bfloat16):
            reconstruction = model["decoder"](encode(x, masks[i]))
        pixels = masks[i].repeat_interleave(patch, 1).repeat_interleave(patch, 2).unsqueeze(1).contiguous()
        loss_recon = F.l1_loss(x, reconstruction.float(), reduction="none")
        loss = (loss_recon * pixels).sum() / (pixels.sum() + 1e-5) / 3
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss
    return BareLoop(cfg.train.steps, step, trained)


# -- DINOv2 -------------------------------------------------------------------------------------------------
def bare_dinov2_run(cfg, dist) -> BareLoop:
    """facebookresearch/dinov2's ``SSLMetaArch`` step: the masks, their flat indices and weights made
    in the collate function; the teacher (backbone, DINO head, iBOT head) on the unmasked global
    crops, its class outputs swapped between the two crops, its patch outputs taken at the masked
    indices, both centred by Sinkhorn-Knopp or by an EMA centre (``objective.centering``); the student
    on the global crops with masked patches replaced by its mask token (``torch.where``) and on the
    local crops; DINO's loss over the class tokens, iBOT's over the masked patches, KoLeo on each
    global crop's class tokens; the global gradient norm clipped; fused AdamW in DINOv2's parameter
    groups (lr multiplier, weight decay multiplier, last layer), the prototypes at lr 0 for
    ``freeze_last_layer_steps``; the weight decay's cosine; a foreach EMA. The losses are taken in
    fp32, as vitscale takes them."""
    from pretrain.objectives.dinov2 import draw_masks  # the distribution DINOv2's collate draws

    o, d = cfg.objective, cfg.data
    torch.manual_seed(0)
    b = d.batch_size
    ibot_head = "head" if o.share_head else "ibot_head"

    def network():
        backbone = create_backbone(cfg.model, d.image_size, 0)
        def head(out_dim: int) -> nn.Module:
            return DINOHead(backbone.num_features, out_dim, o.hidden_dim, o.bottleneck_dim, o.head_layers,
                            o.norm_last_layer)
        heads = {"head": head(o.out_dim), **({} if o.share_head else {"ibot_head": head(o.ibot_out_dim)})}
        return nn.ModuleDict({"backbone": backbone, **heads}).to(dist.device)
    student = network()
    teacher = _momentum_copy(student, network)
    mask_token = nn.Parameter(torch.zeros(1, student["backbone"].embed_dim, device=dist.device))
    trained = {**_trainable(student), "mask_token": mask_token}
    depth = len(student["backbone"].blocks)

    def lr_multiplier(name: str) -> float:  # dinov2/utils/param_groups.py get_vit_lr_decay_rate
        layer = depth + 1
        if name == "mask_token" or name.startswith(("backbone.pos_embed", "backbone.patch_embed", "backbone.cls_token",
                                                    "backbone.reg_token")):
            layer = 0
        elif name.startswith("backbone.blocks."):
            layer = int(name.split(".")[2]) + 1
        rate = o.layerwise_decay ** (depth + 1 - layer)
        return rate * o.patch_embed_lr_mult if "patch_embed" in name else rate

    kinds: dict[tuple, list] = {}  # fuse_params_groups: one group per (lr, weight decay, last layer) kind
    for name, p in trained.items():  # weight decay: optim.no_decay [1d] (the official: biases, norms, gammas)
        kinds.setdefault((lr_multiplier(name), 0.0 if p.ndim <= 1 else 1.0, "last_layer" in name), []).append(p)
    optimizer = _adamw([{"params": ps, "lr_multiplier": lr_m, "wd_multiplier": wd_m, "is_last_layer": last}
                        for (lr_m, wd_m, last), ps in kinds.items()], cfg)
    student_params, teacher_params = list(student.parameters()), list(teacher.parameters())
    center = torch.zeros(1, o.out_dim, device=dist.device)
    ibot_center = torch.zeros(1, o.out_dim if o.share_head else o.ibot_out_dim, device=dist.device)

    global_crops = _crops(d.image_size, 2 * b, dist)  # crop-major: every image's first crop, then its second
    local_crops = _crops(o.local_size, o.local_crops * b, dist)
    side = d.image_size // _patch_size(student["backbone"])
    rng = random.Random(0)

    def collate():  # collate_data_and_cast: masks, their flat indices, iBOT's weights, the masked count
        masks = draw_masks(2 * b, side, side, o.mask_probability, o.mask_ratio, rng)
        flat = masks.flatten(1)
        weights = (1 / flat.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(flat)[flat]
        return (masks.to(dist.device), flat.flatten().nonzero().flatten().to(dist.device), weights.to(dist.device),
                torch.full((1,), float(flat.sum()), device=dist.device))
    batches = [collate() for _ in range(cfg.train.steps)]

    def tokens(backbone, images, masks=None):
        """DinoVisionTransformer's prepare_tokens_with_masks and forward_features on timm's ViT:
        (class tokens, patch tokens) after the final norm."""
        x = backbone.patch_embed(images)  # N x H x W x C (dynamic_img_size)
        if masks is not None:
            x = torch.where(masks.unsqueeze(-1), mask_token.to(x.dtype), x)
        x = backbone.norm(backbone.blocks(backbone.norm_pre(backbone.patch_drop(backbone._pos_embed(x)))))
        return x[:, 0], x[:, backbone.num_prefix_tokens:]
    tokens = _compiled(tokens, cfg)

    def softmax_center(teacher_output, center, temp):
        return F.softmax((teacher_output.float() - center) / temp, dim=-1)

    def teacher_temp(i: int) -> float:
        warmup = o.teacher_temp_warmup_steps or 0
        return o.teacher_temp_final if i >= warmup else \
            o.teacher_temp + (o.teacher_temp_final - o.teacher_temp) * i / warmup

    frozen_steps = o.freeze_last_layer_steps or 0
    optim = cfg.optim

    def step(i: int) -> torch.Tensor:
        nonlocal center, ibot_center
        masks, indices, weights, masked = batches[i]
        temp = teacher_temp(i)
        wd = cosine(i, cfg.train.steps, optim.weight_decay, optim.weight_decay_end or optim.weight_decay)
        for g in optimizer.param_groups:  # apply_optim_scheduler
            g["lr"] = (0.0 if g["is_last_layer"] and i < frozen_steps else optim.lr) * g["lr_multiplier"]
            g["weight_decay"] = wd * g["wd_multiplier"]
        with torch.autocast(dist.device.type, dtype=torch.bfloat16):
            with torch.no_grad():
                t_cls, t_patches = tokens(teacher["backbone"], global_crops)
                t_cls = torch.cat(t_cls.chunk(2)[::-1])  # so that the student's crop A meets the teacher's B
                t_out = teacher["head"](t_cls)
                t_patch_out = teacher[ibot_head](torch.index_select(t_patches.flatten(0, 1), 0, indices))
                if o.centering == "sinkhorn_knopp":
                    t_p = sinkhorn_knopp_teacher(t_out, temp, len(t_out))
                    t_patch_p = sinkhorn_knopp_teacher(t_patch_out, temp, masked)
                else:
                    t_p = softmax_center(t_out, center, temp)
                    t_patch_p = softmax_center(t_patch_out, ibot_center, temp)
                    m = o.center_momentum
                    center = center * m + t_out.float().mean(0, keepdim=True) * (1 - m)
                    ibot_center = ibot_center * m + t_patch_out.float().mean(0, keepdim=True) * (1 - m)
                t_p = t_p.view(2, -1, t_p.shape[-1])
            s_cls, s_patches = tokens(student["backbone"], global_crops, masks)
            s_local_cls, _ = tokens(student["backbone"], local_crops)
            s_out = student["head"](torch.cat([s_cls, s_local_cls]))
            s_patch_out = student[ibot_head](torch.index_select(s_patches.flatten(0, 1), 0, indices))
        dino_part = dinov2_class_loss(s_out, t_p, o.local_crops, o.student_temp)
        # iBOT's scale: 2 (the global crops in one batch) times 1 / 2 crops.
        ibot_part = ibot_masked_loss(s_patch_out, t_patch_p, weights, len(masks), o.student_temp)
        koleo_part = sum(koleo(c) for c in s_cls.chunk(2))
        loss = o.dino_loss_weight * dino_part + o.ibot_loss_weight * ibot_part + o.koleo_loss_weight * koleo_part
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(trained.values()), cfg.train.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _ema(teacher_params, student_params, cosine(i, cfg.train.steps, o.momentum, 1.0))
        return loss
    return BareLoop(cfg.train.steps, step, trained)


BARE_STEPS = {"supervised": bare_supervised_run, "dino": bare_dino_run, "moby": bare_moby_run,
              "simmim": bare_simmim_run, "dinov2": bare_dinov2_run}
