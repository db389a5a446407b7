"""Networks for autocls.

Every network follows timm's model contract (``num_classes``, ``num_features``,
``forward_features``, ``forward_head(x, pre_logits=False)``, ``reset_classifier``,
``get_classifier``) so any of them can serve as classifier, teacher, student or export target.
Configs point at the entry points directly (``_target_: src.models.resnet_cifar.resnet_cifar``),
so this package imports nothing eagerly: the default run must not pay for importing timm.
"""
