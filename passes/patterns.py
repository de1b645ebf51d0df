"""Which torch callables and modules are which op: the one table the options and the calibrator share.

Each table holds the Python-level callables torch.fx records and the aten overloads of a graph
captured with torch.export (``passes.export``) whose arguments come in the same order, so one
argument reader serves both.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CONV_MODULES", "CONV_FUNCS", "ATEN_CONVOLUTION", "LINEAR_MODULES", "LINEAR_FUNCS", "RELU_FUNCS",
           "RELU_INPLACE", "LEAKY_FUNCS", "LEAKY_INPLACE", "POOL_MODULES", "POOL_FUNCS", "ATEN_POOL_DIMS",
           "NORM_MODULES", "NORM_FUNCS"]

aten = torch.ops.aten

CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_FUNCS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3, torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3,
              aten.conv1d.default: 1, aten.conv2d.default: 2, aten.conv3d.default: 3}
"""conv function -> number of spatial dims; all take (input, weight, bias, stride, padding, dilation, groups)"""
ATEN_CONVOLUTION = (aten.convolution.default,)
"""(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups): a decomposed graph's conv"""
LINEAR_MODULES = (nn.Linear,)
LINEAR_FUNCS = (F.linear, aten.linear.default)
RELU_FUNCS = (F.relu, torch.relu, torch.relu_, F.relu_, aten.relu.default, aten.relu_.default)
RELU_INPLACE = (torch.relu_, F.relu_, aten.relu_.default)
LEAKY_FUNCS = (F.leaky_relu, F.leaky_relu_, aten.leaky_relu.default, aten.leaky_relu_.default)
LEAKY_INPLACE = (F.leaky_relu_, aten.leaky_relu_.default)
POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
ATEN_POOL_DIMS = {aten.max_pool1d.default: 1, aten.max_pool2d.default: 2, aten.max_pool3d.default: 3}
POOL_FUNCS = (F.max_pool1d, F.max_pool2d, F.max_pool3d, *ATEN_POOL_DIMS)
"""all take (input, kernel_size, stride, padding, dilation, ceil_mode[, return_indices]); aten's
have no return_indices (max_poolNd_with_indices is another op) and stride [] for the kernel's"""

NORM_MODULES = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm, nn.LayerNorm)
_BN_F = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
_BN_ATEN = ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps", "cudnn_enabled")
_IN_F = ("input", "running_mean", "running_var", "weight", "bias", "use_input_stats", "momentum", "eps")
_IN_ATEN = ("input", "weight", "bias", "running_mean", "running_var", "use_input_stats", "momentum", "eps",
            "cudnn_enabled")
NORM_FUNCS = {F.batch_norm: ("batch", _BN_F), torch.batch_norm: ("batch", _BN_ATEN),
              aten.batch_norm.default: ("batch", _BN_ATEN),
              F.instance_norm: ("instance", _IN_F), torch.instance_norm: ("instance", _IN_ATEN),
              aten.instance_norm.default: ("instance", _IN_ATEN),
              F.group_norm: ("group", ("input", "num_groups", "weight", "bias", "eps")),
              torch.group_norm: ("group", ("input", "num_groups", "weight", "bias", "eps", "cudnn_enabled")),
              aten.group_norm.default: ("group", ("input", "num_groups", "weight", "bias", "eps", "cudnn_enabled")),
              F.layer_norm: ("layer", ("input", "normalized_shape", "weight", "bias", "eps")),
              torch.layer_norm: ("layer", ("input", "normalized_shape", "weight", "bias", "eps", "cudnn_enable")),
              aten.layer_norm.default: ("layer", ("input", "normalized_shape", "weight", "bias", "eps", "cudnn_enable"))}
"""norm callable -> (kind, argument names in order): "batch", "instance", "group" or "layer"."""
