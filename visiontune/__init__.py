"""visiontune: fine-tune ImageNet backbones on your images with TFX and serve them.

Importing any part of visiontune runs this first, so it is where Keras 2 is
chosen: ``tf.keras`` must mean ``tf_keras`` before TensorFlow is imported.
TensorFlow Transform's ``TransformFeaturesLayer`` is a tf_keras model and the
TF Serving export needs ``save_format='tf'``, which Keras 3 rejects; mixing
the two Keras versions in one process fails in confusing ways.  TFX executors
and Beam workers import ``visiontune.components...`` by module path, so they
pass through here too.
"""

import os

os.environ["TF_USE_LEGACY_KERAS"] = "1"
# TensorFlow's C++ start-up chatter hides our own messages; errors still show.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
