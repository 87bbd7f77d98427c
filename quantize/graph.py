"""The order of operations of a quantized MobileNetV2, written once. Every evaluator walks it:

    evaluator                      where                 a value is
    fake-quant forward             quantize/qmodel.py    a float tensor
    input links (bias scale)       link_inputs below     the quantization point that produced it
    two-stream layer walk (PTQ)    quantize/walk.py      (float-model tensor, quantized-model tensor)
    Q/DQ export model              export/qdq.py         a float tensor between Q/DQ ops
    integer simulation             export/intsim.py      (integer codes, (scale, zero-point))

The graph, with the names of the model's own modules (mobilenet/model.py; QMobileNet and the Q/DQ model mirror
them, so a module path means the same layer in each):

    node        reads                        computes                                   output quantization point
    input       the image (N, 3, H, W)       nothing                                    quant_in
    features    each entry in order, a layer or a block:
      layer     the previous value           conv (BN folded) [+ ReLU6 clamp]           layer.out_fq
      block     the previous value x         its `conv` layers in order -> y, then
                                             if use_res_connect: the residual x + y     block.add_fq
    pool        the last feature map         mean over H, W: (N, C, H, W) -> (N, C)     pool_fq
    dropout     the pooled features          identity outside training                  (passes its input's)
    classifier  the previous value           linear                                     classifier.out_fq

An evaluator is an `Ops`: one method per node kind, called by `network` in the order above. A new kind of node is
one method here and one in each evaluator; a new weight storage (packed INT4, fp16, sparse) changes only what
the evaluators' `layer` computes; other input sizes change nothing here.

Evaluators that are modules (the fake-quant and the Q/DQ models) run `features` and a block's `conv` by calling
the nn.Sequential, whose children run their own forward (a block's forward is `block` below): module calls then
nest as in the float model, and the converter names the file's tensors after that nesting.
"""
from __future__ import annotations

__all__ = ["Ops", "network", "block", "is_block", "link_inputs"]


def is_block(m) -> bool:
    """An inverted residual block (a `conv` sequence and a residual flag), as opposed to a single layer."""
    return hasattr(m, "use_res_connect")


class Ops:
    """What each node computes for one evaluator. `net`, `block`, `layer` are the evaluator's own modules."""

    def input(self, net, x):
        raise NotImplementedError

    def layer(self, layer, x):
        raise NotImplementedError

    def add(self, block, skip, y):
        """The residual sum of a block's input `skip` and its last layer's output `y`, at the block's point."""
        raise NotImplementedError

    def pool(self, net, x):
        raise NotImplementedError

    def dropout(self, net, x):
        return x

    def sequence(self, seq, x):
        """`features` or a block's `conv`: its entries in order."""
        for m in seq:
            x = block(m, x, self) if is_block(m) else self.layer(m, x)
        return x


def block(blk, x, ops: Ops):
    """An inverted residual block: its layers in order, then the residual add where the block has one."""
    y = ops.sequence(blk.conv, x)
    return ops.add(blk, x, y) if blk.use_res_connect else y


def network(net, x, ops: Ops):
    """The whole graph on `x`, in the order of the table above; returns the classifier's value."""
    x = ops.input(net, x)
    x = ops.sequence(net.features, x)
    x = ops.pool(net, x)
    return ops.layer(net.classifier, ops.dropout(net, x))


class _InputLinks(Ops):
    """A value is the quantization point that produced it (None: a float value)."""

    def input(self, net, x):
        return net.quant_in

    def layer(self, layer, src):
        layer.__dict__["input_fq"] = src  # a reference, not a child module
        return layer.out_fq

    def add(self, block, skip, y):
        return block.add_fq

    def pool(self, net, x):
        return net.pool_fq


def link_inputs(qm) -> None:
    """Tell every QLayer of `qm` (a QMobileNet) which quantization point feeds it, as `layer.input_fq`: its input
    scale sets the integer bias scale s_in * s_w. Call again after replacing quantization points."""
    network(qm, None, _InputLinks())
