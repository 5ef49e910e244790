"""timm's models for the coverage sweep and the one-process memory-safety sweep (:mod:`.sweep`)."""

from __future__ import annotations

from typing import Dict

#: name -> family; the smallest variant of each family, plus a few with a special layer (noted).
MODELS: Dict[str, str] = {
    "resnet18": "resnet",
    "resnet50": "resnet",
    "resnet18d": "resnet",  # deep stem, avg-pool downsample
    "resnet10t": "resnet",
    "resnext26ts": "resnext",
    "resnext50_32x4d": "resnext",
    "seresnet18": "senet",
    "legacy_seresnet18": "senet",
    "seresnext26d_32x4d": "senet",
    "ecaresnet26t": "senet",  # ECA attention (conv1d over channels)
    "gcresnet33ts": "senet",  # global context attention
    "regnetx_002": "regnet",
    "regnety_002": "regnet",
    "regnetz_005": "regnetz",
    "efficientnet_b0": "efficientnet",
    "tf_efficientnet_b0": "efficientnet",  # Conv2dSame (TF 'SAME' padding)
    "efficientnet_b0_gn": "efficientnet",  # GroupNorm
    "efficientnet_cc_b0_4e": "efficientnet",  # CondConv2d (routed expert kernels)
    "efficientnetv2_rw_t": "efficientnetv2",
    "tf_efficientnetv2_b0": "efficientnetv2",
    "tinynet_e": "tinynet",
    "mobilenetv2_035": "mobilenetv2",
    "mobilenetv3_small_050": "mobilenetv3",
    "mobilenetv4_conv_small_035": "mobilenetv4",
    "mobilenetv4_hybrid_medium": "mobilenetv4",  # attention blocks
    "mnasnet_small": "mnasnet",
    "semnasnet_050": "mnasnet",
    "fbnetc_100": "fbnet",
    "fbnetv3_b": "fbnet",
    "ghostnet_050": "ghostnet",
    "ghostnetv2_100": "ghostnet",
    "ghostnetv3_050": "ghostnet",
    "repghostnet_050": "repghost",
    "rexnet_100": "rexnet",
    "mixnet_s": "mixnet",
    "densenet121": "densenet",
    "dla34": "dla",
    "dla46_c": "dla",
    "dla60_res2net": "dla",
    "dpn48b": "dpn",
    "hrnet_w18_small": "hrnet",
    "cspresnet50": "cspnet",
    "cspdarknet53": "cspnet",
    "cs3darknet_s": "cspnet",
    "darknet17": "darknet",
    "sedarknet21": "darknet",
    "res2net50_14w_8s": "res2net",
    "resnest14d": "resnest",
    "skresnet18": "sknet",
    "nf_resnet26": "nfnet",  # ScaledStdConv2d
    "dm_nfnet_f0": "nfnet",
    "repvgg_a0": "repvgg",
    "repvgg_a0@reparam": "repvgg",  # after reparameterize(): one 3x3 conv per block
    "mobileone_s0": "mobileone",
    "mobileone_s0@reparam": "mobileone",
    "convnext_atto": "convnext",  # LayerNorm
    "convnextv2_atto": "convnext",  # GRN
    "inception_v3": "inception",
    "inception_v4": "inception",
    "xception41": "xception",
    "ese_vovnet19b_dw": "vovnet",
    "vovnet39a": "vovnet",
    "selecsls42b": "selecsls",
    "gernet_s": "gernet",
    "lcnet_050": "lcnet",
    "tresnet_m": "tresnet",  # space-to-depth stem, anti-aliasing
    "resnetv2_18": "resnetv2",  # pre-activation
    "resnetv2_50x1_bit": "resnetv2",  # StdConv2d + GroupNorm
    "hgnetv2_b0": "hgnet",
    "hgnet_tiny": "hgnet",
    "vgg11_bn": "vgg",
    "repvit_m0_9": "repvit",
    "fastvit_t8": "fastvit",
    "mobilevit_xxs": "mobilevit (hybrid)",
    "edgenext_xx_small": "edgenext (hybrid)",
    "efficientvit_b0": "efficientvit (hybrid)",
    "efficientvit_m0": "efficientvit (hybrid)",
    "lambda_resnet26t": "lambda (hybrid)",
    "inception_next_atto": "inception_next",
}

#: name suffix: prune the model after ``timm.utils.reparameterize_model`` (its fused inference form)
REPARAM = "@reparam"

#: Models checked in float64: at random init their float32 forward is numerically meaningless (repvit_m0_9:
#: activations reach 1e7 and the float32 logits differ from float64 ones by 100%), so a float32 comparison
#: measures rounding, not the pruning (in float64 its stripe conversion matches to 1e-13).
FLOAT64 = {"repvit_m0_9"}

# Per-model input size where the default does not suit (every model above runs at 96x96 in timm 1.0.31).
SIZES: Dict[str, int] = {}
