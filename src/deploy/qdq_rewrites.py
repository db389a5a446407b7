"""Exact ONNX graph rewrites around onnxruntime's static quantiser that keep MobileNet-style networks
in integer arithmetic from end to end (used by `src.deploy.quantize.quantize_onnx_static`).

onnxruntime fuses a QDQ graph into integer kernels only where it has one for the pattern; every other
op runs in float between a DequantizeLinear and a QuantizeLinear, each a full pass over the feature
map. In MobileNetV3 (squeeze-excitation gates, hard-swish) two such float islands cost more than the
integer convolutions save:

* `global_average_pools` (before quantisation): torch exports global average pooling as ReduceMean,
  which the quantiser leaves in float; the same op written as GlobalAveragePool gets
  QLinearGlobalAveragePool, reading the uint8 map directly.
* `integer_hard_sigmoids` (after quantisation): HardSigmoid (in every hard-swish and SE gate) has no
  integer kernel. It is `clip(alpha * x + beta, 0, 1)`; the scaling by alpha is a change of the
  dequantisation scale, the `+ beta` an Add (which onnxruntime runs as QLinearAdd), and the clip is the
  saturation of the output's uint8 range when that range is [0, <= 1], as calibration makes it.

Both compute the same as the graph without them (tested; the HardSigmoid one up to how an exact .5
tie rounds, one uint8 step); scripts/int8_recipes.py measures what they save.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


# --- helpers --------------------------------------------------------------------------------------
def _constant_values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    values = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    """Known tensor ranks (after shape inference) by name."""
    infos = list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)
    return {info.name: len(info.type.tensor_type.shape.dim) for info in infos
            if info.type.HasField("tensor_type") and info.type.tensor_type.HasField("shape")}


def _attributes(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return consumers


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {name for node in model.graph.node for name in node.input}
    for init in [init for init in model.graph.initializer if init.name not in used]:
        model.graph.initializer.remove(init)


# --- before quantisation --------------------------------------------------------------------------
def _is_spatial_mean(node: onnx.NodeProto, constants: dict[str, np.ndarray], ranks: dict[str, int]) -> bool:
    """Whether `node` is a ReduceMean over the last two axes of a 4-D tensor that keeps its dims."""
    if node.op_type != "ReduceMean" or ranks.get(node.input[0]) != 4:
        return False
    attributes = _attributes(node)
    if attributes.get("keepdims", 1) != 1:
        return False
    axes = attributes.get("axes")  # an attribute up to opset 17, an input from 18 on
    if axes is None and len(node.input) > 1:
        axes = constants.get(node.input[1])
    return axes is not None and sorted(int(a) % 4 for a in np.ravel(axes)) == [2, 3]


def global_average_pools(model: onnx.ModelProto) -> int:
    """Rewrite, in place, every ReduceMean over H and W of an NCHW tensor (keepdims) as the equivalent
    GlobalAveragePool; returns how many were rewritten. Needs shape inference to have run (the
    quantiser's `quant_pre_process` does it)."""
    constants, ranks = _constant_values(model), _ranks(model)
    nodes = model.graph.node
    count = 0
    for index, node in enumerate(list(nodes)):
        if _is_spatial_mean(node, constants, ranks):
            nodes.remove(node)
            nodes.insert(index, helper.make_node("GlobalAveragePool", [node.input[0]], list(node.output), name=node.name))
            count += 1
    if count:
        _drop_unused_initializers(model)  # the axes of the rewritten means
    return count


def _hard_sigmoid_bounds(x: str, users: list[onnx.NodeProto]) -> tuple[float, float | None] | None:
    """(lower, upper) bounds outside which the consumers `users` of tensor `x` do not depend on its
    value, if they are only HardSigmoids of `x` and Muls of `x` by those HardSigmoids (hard-swish);
    None otherwise. HardSigmoid is 0 below -beta/alpha and 1 above (1 - beta)/alpha; a hard-swish
    (x * HardSigmoid(x)) is 0 below the same point but grows with x above."""
    sigmoids = [u for u in users if u.op_type == "HardSigmoid"]
    lows, highs = [], []
    for node in sigmoids:
        attributes = _attributes(node)
        alpha, beta = float(attributes.get("alpha", 0.2)), float(attributes.get("beta", 0.5))
        if alpha <= 0:
            return None
        lows.append(-beta / alpha)
        highs.append((1 - beta) / alpha)
    gates = {node.output[0] for node in sigmoids}
    others = [u for u in users if u.op_type != "HardSigmoid"]
    if not sigmoids or not all(u.op_type == "Mul" and sorted(u.input) == sorted([x, *gates & set(u.input)])
                               and len(gates & set(u.input)) == 1 for u in others):
        return None
    return min(lows), (None if others else max(highs))


def clip_hard_sigmoid_inputs(model: onnx.ModelProto) -> int:
    """Insert, in place, `Clip(x, lower[, upper])` in front of every tensor that only feeds
    HardSigmoids and hard-swishes (`_hard_sigmoid_bounds`), which changes nothing in float; returns how
    many were clipped.

    Why: the quantiser calibrates each tensor's uint8 range on its whole min-max range, but a
    hard-swish input only matters above -3 (where hard-swish leaves 0). A convolution feeding one can
    reach far below (-146 to 8 for the head of a MobileNetV3-Large trained on CIFAR), so its uint8 step
    (0.6) is coarser than the whole of hard-swish's negative lobe, and that network's INT8 top-1 fell to
    chance. onnxruntime's quantiser removes a Clip that is the only user of its input and gives that
    input the Clip's output range ([-3, 8] here: a step of 0.04); values below saturate to -3."""
    consumers = _consumers(model)
    outputs = {output.name for output in model.graph.output}
    nodes = model.graph.node
    count = 0
    for x, users in list(consumers.items()):
        bounds = _hard_sigmoid_bounds(x, users) if x not in outputs else None
        if bounds is None:
            continue
        lower, upper = bounds
        clipped = f"{x}_clipped"
        model.graph.initializer.append(numpy_helper.from_array(np.array(lower, np.float32), f"{clipped}_min"))
        inputs = [x, f"{clipped}_min"]
        if upper is not None:
            model.graph.initializer.append(numpy_helper.from_array(np.array(upper, np.float32), f"{clipped}_max"))
            inputs.append(f"{clipped}_max")
        for user in users:
            user.input[:] = [clipped if name == x else name for name in user.input]
        nodes.insert(min(list(nodes).index(user) for user in users), helper.make_node("Clip", inputs, [clipped],
                                                                                        name=clipped))
        count += 1
    return count


# --- after quantisation ---------------------------------------------------------------------------
def _scalar(values: dict[str, np.ndarray], name: str) -> np.ndarray | None:
    value = values.get(name)
    return value if value is not None and value.size == 1 else None


def integer_hard_sigmoids(model: onnx.ModelProto) -> int:
    """Rewrite, in place, each `DequantizeLinear(x_q; s, z) -> HardSigmoid -> QuantizeLinear(; s_h, 0)`
    of a QDQ graph as `DequantizeLinear(x_q; alpha * s, z) + DequantizeLinear(beta)` into the same
    QuantizeLinear; returns how many were rewritten.

    The result is the same (up to how an exact .5 tie rounds): `alpha * x = (alpha * s) * (x_q - z)`,
    and the uint8 output (zero point 0, scale <= 1/255) saturates below 0 and above 1 exactly where
    HardSigmoid clips. onnxruntime fuses the new pattern into QLinearAdd. A HardSigmoid whose output range does not start at 0 or reaches
    past 1 (not produced by calibration of a HardSigmoid) is left alone."""
    values = _constant_values(model)
    producers = {name: node for node in model.graph.node for name in node.output}
    consumers = _consumers(model)
    nodes = model.graph.node
    count = 0
    for node in list(nodes):
        if node.op_type != "HardSigmoid":
            continue
        attributes = _attributes(node)
        alpha, beta = float(attributes.get("alpha", 0.2)), float(attributes.get("beta", 0.5))
        dequantize, users = producers.get(node.input[0]), consumers.get(node.output[0], [])
        if (dequantize is None or dequantize.op_type != "DequantizeLinear" or len(users) != 1
                or users[0].op_type != "QuantizeLinear" or alpha <= 0 or beta <= 0):
            continue
        quantize = users[0]
        scale, zero_point = _scalar(values, dequantize.input[1]), _scalar(values, dequantize.input[2])
        out_scale, out_zero_point = _scalar(values, quantize.input[1]), _scalar(values, quantize.input[2])
        if scale is None or zero_point is None or out_scale is None or out_zero_point is None:
            continue  # per-channel or computed parameters
        if out_zero_point.dtype != np.uint8 or int(out_zero_point) != 0 or float(out_scale) * 255 > 1 + 1e-6:
            continue  # the output's range is not inside [0, 1]: saturation would not be the clip
        prefix = f"{quantize.output[0]}_hard_sigmoid"
        model.graph.initializer.extend([
            numpy_helper.from_array(np.array(float(scale) * alpha, np.float32), f"{prefix}_x_scale"),
            # beta as a uint8 constant: 255 * (beta / 255)
            numpy_helper.from_array(np.array(255, np.uint8), f"{prefix}_beta_quantized"),
            numpy_helper.from_array(np.array(beta / 255, np.float32), f"{prefix}_beta_scale"),
            numpy_helper.from_array(np.array(0, np.uint8), f"{prefix}_beta_zero_point"),
        ])
        rewritten = [
            helper.make_node("DequantizeLinear", [dequantize.input[0], f"{prefix}_x_scale", dequantize.input[2]],
                             [f"{prefix}_alpha_x"], name=f"{prefix}_alpha_x"),
            helper.make_node("DequantizeLinear", [f"{prefix}_beta_quantized", f"{prefix}_beta_scale",
                                                  f"{prefix}_beta_zero_point"], [f"{prefix}_beta"], name=f"{prefix}_beta"),
            helper.make_node("Add", [f"{prefix}_alpha_x", f"{prefix}_beta"], list(node.output), name=f"{prefix}_add"),
        ]
        index = list(nodes).index(node)
        nodes.remove(node)
        for offset, new in enumerate(rewritten):
            nodes.insert(index + offset, new)
        if all(user is node for user in consumers.get(dequantize.output[0], [])):
            nodes.remove(dequantize)  # hard-swish's Mul still reads it; an SE gate's HardSigmoid was its only user
        count += 1
    return count
