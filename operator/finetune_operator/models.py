"""The keras.applications model classes the trainer can build, known without importing Keras.

The operator never imports TensorFlow or Keras, yet must turn an unknown `spec.model.base`
into Failed/InvalidSpec at once rather than after a pod has pulled a multi-GB image. This
list matches Keras 3's `keras.applications`; a unit test compares it with the installed Keras.
"""

from __future__ import annotations

__all__ = ["KERAS_APPLICATIONS"]

KERAS_APPLICATIONS: frozenset[str] = frozenset(
    {
        "ConvNeXtBase", "ConvNeXtLarge", "ConvNeXtSmall", "ConvNeXtTiny", "ConvNeXtXLarge",
        "DenseNet121", "DenseNet169", "DenseNet201",
        "EfficientNetB0", "EfficientNetB1", "EfficientNetB2", "EfficientNetB3",
        "EfficientNetB4", "EfficientNetB5", "EfficientNetB6", "EfficientNetB7",
        "EfficientNetV2B0", "EfficientNetV2B1", "EfficientNetV2B2", "EfficientNetV2B3",
        "EfficientNetV2L", "EfficientNetV2M", "EfficientNetV2S",
        "InceptionResNetV2", "InceptionV3",
        "MobileNet", "MobileNetV2", "MobileNetV3Large", "MobileNetV3Small",
        "NASNetLarge", "NASNetMobile",
        "ResNet101", "ResNet101V2", "ResNet152", "ResNet152V2", "ResNet50", "ResNet50V2",
        "VGG16", "VGG19", "Xception",
    }
)  # fmt: skip
