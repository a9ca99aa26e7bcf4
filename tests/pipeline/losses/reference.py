"""Plain-loop references, written from the formulas in docs/design.md, independent of the vectorised code."""

import torch


def rows(student, teacher, mask):
    for b in range(student.shape[0]):
        idx = [j for j in range(student.shape[1]) if mask is None or bool(mask[b, j])]
        yield b, idx


def cprd_ref(student, teacher, mask=None, num_valid=None, min_teacher_score=None, lift="negative", positive=None,
             reduction="mean"):
    """lift="positive": the j-th candidate's value in its own term, with the positive's gradient [B];
    lift="only": the candidates below j are constants in j's term; reduction="sum": a row's terms summed (the
    paper's sum over j < J*), not averaged."""
    losses = []
    for b, idx in rows(student, teacher, mask):
        order = sorted(idx, key=lambda j: -float(teacher[b, j]))  # sorted() is stable
        n = len(order)
        m = 0
        for j, c in enumerate(order):
            if j >= n - 1 or (num_valid is not None and j >= num_valid):
                break
            if min_teacher_score is not None and float(teacher[b, c]) < min_teacher_score:
                break
            m += 1
        if m == 0:
            continue
        total = 0
        for j in range(m):
            anchor = student[b, order[j]] if lift != "positive" else anchor_ref(student[b, order[j]], positive[b])
            tail = torch.stack([anchor] + [below_ref(student[b, order[l]], lift) for l in range(j + 1, n)])
            total = total + torch.logsumexp(tail, 0) - anchor
        losses.append(total / m if reduction == "mean" else total)
    return torch.stack(losses).mean() if losses else None


def anchor_ref(value, positive):
    return value.detach() + positive - positive.detach()


def below_ref(value, lift):
    return value.detach() if lift == "only" else value


def ordered_pairs_ref(student, teacher, mask=None, num_valid=None, min_teacher_score=None, tie_margin=None,
                      reduction="mean", term=None):
    """A loop over CPRD's ordered pairs: per row in teacher order (stable), each valid j with the candidates l the
    teacher ranks below it (with tie_margin d: scored at least d lower; a j with none is skipped), its term
    term(b, c, below); a row's terms averaged ("mean") or summed ("sum"); the mean over rows with any."""
    losses = []
    for b, idx in rows(student, teacher, mask):
        order = sorted(idx, key=lambda j: -float(teacher[b, j]))  # sorted() is stable
        terms = []
        for j, c in enumerate(order):
            if num_valid is not None and j >= num_valid:
                break
            if min_teacher_score is not None and float(teacher[b, c]) < min_teacher_score:
                break
            below = [l for l in order[j + 1:]
                     if tie_margin is None or float(teacher[b, l]) <= float(teacher[b, c]) - tie_margin]
            if below:
                terms.append(term(b, c, below))
        if terms:
            losses.append(sum(terms) / (len(terms) if reduction == "mean" else 1))
    return torch.stack(losses).mean() if losses else None


def cprd_tie_margin_ref(student, teacher, mask=None, num_valid=None, tie_margin=1.0, lift="negative",
                        positive=None, reduction="mean"):
    """CPRD where j is contrasted against itself and every l the teacher scores at least tie_margin lower."""
    def term(b, c, below):
        anchor = student[b, c] if lift != "positive" else anchor_ref(student[b, c], positive[b])
        return torch.logsumexp(torch.stack([anchor] + [below_ref(student[b, l], lift) for l in below]), 0) - anchor

    return ordered_pairs_ref(student, teacher, mask, num_valid, tie_margin=tie_margin, reduction=reduction,
                             term=term)


def partial_pairs_ref(student, teacher, pair, mask=None, num_valid=None, min_teacher_score=None, tie_margin=None,
                      reduction="mean"):
    """CPRD's ordered pairs, each j's term the mean of pair(s_j, s_l) over the l the teacher ranks below it."""
    return ordered_pairs_ref(student, teacher, mask, num_valid, min_teacher_score, tie_margin, reduction,
                             term=lambda b, c, below: sum(pair(student[b, c], student[b, l]) for l in below)
                             / len(below))


def ranknet_pair(hi, lo):
    return torch.log1p(torch.exp(-(hi - lo)))


def hinge_pair(margin):
    return lambda hi, lo: torch.clamp(margin - (hi - lo), min=0)


def kl_ref(student, teacher, mask=None, T=1.0):
    losses = []
    for b, idx in rows(student, teacher, mask):
        if len(idx) < 2:
            continue
        s = torch.stack([student[b, j] for j in idx])
        t = torch.stack([teacher[b, j] for j in idx]) / T
        p = torch.softmax(t, 0)
        q = torch.log_softmax(s, 0)
        losses.append(sum(p[i] * (torch.log(p[i]) - q[i]) for i in range(len(idx))))
    return torch.stack(losses).mean() if losses else None


def margin_mse_ref(s_pos, s_neg, t_pos, t_neg, mask=None):
    losses = []
    for b, idx in rows(s_neg, t_neg, mask):
        if not idx:
            continue
        vals = [((s_pos[b] - s_neg[b, j]) - (t_pos[b] - t_neg[b, j])) ** 2 for j in idx]
        losses.append(sum(vals) / len(vals))
    return torch.stack(losses).mean() if losses else None


def ranknet_ref(student, teacher, mask=None):
    losses = []
    for b, idx in rows(student, teacher, mask):
        pairs = [(i, j) for i in idx for j in idx if float(teacher[b, i]) > float(teacher[b, j])]
        if not pairs:
            continue
        vals = [torch.log1p(torch.exp(-(student[b, i] - student[b, j]))) for i, j in pairs]
        losses.append(sum(vals) / len(vals))
    return torch.stack(losses).mean() if losses else None


def itc_ref(img, txt, scale, positive=None):
    img = img / img.norm(dim=1, keepdim=True)
    txt = txt / txt.norm(dim=1, keepdim=True)
    B = img.shape[0]
    total_i = total_t = 0
    for i in range(B):
        logits = [scale * (img[i] * txt[j]).sum() for j in range(B)]
        pos = [j for j in range(B) if (positive is None and j == i) or (positive is not None and bool(positive[i, j]))]
        lse = torch.logsumexp(torch.stack(logits), 0)
        total_i = total_i + sum(lse - logits[j] for j in pos) / len(pos)
    for j in range(B):
        logits = [scale * (img[i] * txt[j]).sum() for i in range(B)]
        pos = [i for i in range(B) if (positive is None and i == j) or (positive is not None and bool(positive[i, j]))]
        lse = torch.logsumexp(torch.stack(logits), 0)
        total_t = total_t + sum(lse - logits[i] for i in pos) / len(pos)
    return (total_i / B + total_t / B) / 2


def random_case(seed, B=5, N=7, with_mask=True, ties=False):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(B, N, generator=g, dtype=torch.float64) * 3
    teacher = torch.randn(B, N, generator=g, dtype=torch.float64)
    if ties:
        teacher = teacher.round()
    mask = None
    if with_mask:
        mask = torch.rand(B, N, generator=g) > 0.3
        mask[0] = True
        mask[1] = False
        mask[2, 1:] = False  # a single real candidate: nothing to learn
    return student.requires_grad_(), teacher, mask


def assert_same_value_and_grad(fast, ref, student):
    (g_fast,) = torch.autograd.grad(fast, student, retain_graph=True)
    (g_ref,) = torch.autograd.grad(ref, student)
    torch.testing.assert_close(fast.double(), ref.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_fast.double(), g_ref.double(), rtol=1e-4, atol=1e-6)
    assert not torch.isnan(g_fast).any()


def assert_same_value_and_grads(fast, ref, inputs):
    """The value, and the gradient for each of `inputs` (one no path reaches read as zeros)."""
    g_fast = torch.autograd.grad(fast, inputs, retain_graph=True, allow_unused=True)
    g_ref = torch.autograd.grad(ref, inputs, allow_unused=True)
    torch.testing.assert_close(fast.double(), ref.double(), rtol=1e-5, atol=1e-6)
    for x, a, b in zip(inputs, g_fast, g_ref):
        a, b = (torch.zeros_like(x) if g is None else g for g in (a, b))
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-6)


def hard_negatives_ref(s_pos, s_neg, mask=None):
    losses = []
    for b, idx in rows(s_neg, s_neg, mask):
        if not idx:
            continue
        logits = torch.stack([s_pos[b]] + [s_neg[b, j] for j in idx])
        losses.append(torch.logsumexp(logits, 0) - s_pos[b])
    return torch.stack(losses).mean() if losses else None


def sigmoid_ref(img, txt, log_scale, bias, positive=None):
    """-1/B sum_ij log sigmoid(z_ij (t x_i.y_j + b)), one pair at a time, t = exp(log_scale)."""
    B = img.shape[0]
    t = log_scale.exp()
    total = 0.0
    for i in range(B):
        x = img[i] / img[i].norm()
        for j in range(B):
            y = txt[j] / txt[j].norm()
            match = (i == j) if positive is None else bool(positive[i, j])
            z = 1.0 if match else -1.0
            total = total - torch.log(1 / (1 + torch.exp(-z * (t * (x * y).sum() + bias))))
    return total / B
