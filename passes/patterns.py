"""Which torch callables and modules are which op: the one table the options and the calibrator share."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CONV_MODULES", "CONV_FUNCS", "LINEAR_MODULES", "LINEAR_FUNCS", "RELU_FUNCS", "LEAKY_FUNCS",
           "POOL_MODULES", "POOL_FUNCS"]

CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_FUNCS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3, torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3}
"""conv function -> number of spatial dims"""
LINEAR_MODULES = (nn.Linear,)
LINEAR_FUNCS = (F.linear,)
RELU_FUNCS = (F.relu, torch.relu, torch.relu_, F.relu_)
LEAKY_FUNCS = (F.leaky_relu, F.leaky_relu_)
POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
POOL_FUNCS = (F.max_pool1d, F.max_pool2d, F.max_pool3d)
