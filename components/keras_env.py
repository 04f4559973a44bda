"""Makes ``tf.keras`` mean Keras 2 (``tf_keras``) before TensorFlow is imported.

TensorFlow Transform's ``TransformFeaturesLayer`` is a tf_keras model and the
TF Serving export needs ``save_format='tf'``, which Keras 3 rejects; mixing the
two Keras versions in one process fails in confusing ways.  Every package of
this project imports this module first, so no entry point can forget it.
"""

import os

os.environ["TF_USE_LEGACY_KERAS"] = "1"
# TensorFlow's C++ start-up chatter hides our own messages; errors still show.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
