"""Every name that crosses a boundary: feature keys, signatures, outputs, files.

Ingest writes these features, Transform reads and produces them, the Trainer
and the Evaluator consume them, the exported signatures and the serving
clients speak them, and the report reads the files.  A name lives here once;
no imports, so any layer may use it (the TFX penguin template's
``models/features.py``).
"""

# Raw tf.Example features, as ingest writes them.
IMAGE_KEY = "image"  # encoded PNG or JPEG bytes
IMAGE_FORMAT_KEY = "image_format"  # "png" | "jpeg"
FILENAME_KEY = "filename"  # path relative to the source
HEIGHT_KEY = "height"  # of the stored image, pixels
WIDTH_KEY = "width"
LABEL_KEY = "label"  # class name (classification)
MASK_KEY = "mask"  # lossless single-channel PNG (segmentation)

# Transformed features (Transform's output, the Trainer's and TFMA's input).
PIXELS_KEY = "pixels"  # [size, size, 3] uint8
LABEL_ID_KEY = "label_id"  # index into the class list
MASK_IDS_KEY = "mask_ids"  # [size, size] class ids, VOID_ID for void pixels
IMAGE_HEIGHT_KEY = "image_height"  # the decoded image's size before resizing (segmentation)
IMAGE_WIDTH_KEY = "image_width"
# Class id of void pixels in transformed masks.
VOID_ID = 255

# Signatures of the exported SavedModel and their inputs.
SERVING_DEFAULT = "serving_default"  # encoded image bytes in
SERVING_EXAMPLES = "serving_examples"  # serialized tf.Example in
TRANSFORM_FEATURES = "transform_features"  # serialized tf.Example -> transformed features (TFMA)
IMAGE_BYTES_INPUT = "image_bytes"  # "_bytes": REST clients send it as {"b64": ...}
EXAMPLES_INPUT = "examples"
# TF Serving's classification SignatureDef (Classify, :classify): method, input and output keys are
# TF Serving's own (signature_constants); serialized tf.Example in, every class best first out.
CLASSIFY_SIGNATURE = "classification"
CLASSIFY_METHOD = "tensorflow/serving/classify"
PREDICT_METHOD = "tensorflow/serving/predict"
REGRESS_METHOD = "tensorflow/serving/regress"
CLASSIFY_INPUTS = "inputs"  # serialized tf.Example [batch]

# Signature outputs.
CLASSES_OUTPUT = "classes"  # top class name
CLASS_IDS_OUTPUT = "class_ids"  # top class id (segmentation: per pixel)
SCORES_OUTPUT = "scores"  # top class probability
PROBABILITIES_OUTPUT = "probabilities"  # every class
MASK_BYTES_OUTPUT = "mask_bytes"  # segmentation: PNG mask at the size sent
FOREGROUND_PROBABILITY_OUTPUT = "foreground_probability"

# Files.
CLASSES_FILE = "classes.txt"  # one class name a line: the one class order
REJECTS_FILE = "rejects.csv"  # file, reason: every input image not in the output
SUMMARY_FILE = "summary.json"  # what ingest wrote, per split and class
METADATA_DIR = "assets.extra"  # inside a SavedModel: read by clients; TF Serving reads only its warm-up file
MODEL_METADATA_FILE = "visiontune.json"  # in METADATA_DIR: backbone, input size, classes
TFLITE_DIR = "tflite"  # in METADATA_DIR: the TensorFlow Lite models, pushed with the SavedModel
TFLITE_VARIANTS = ("float16", "int8")  # export.tflite's choices, in the order they are written
TFLITE_FILES = {"float16": "model_float16.tflite", "int8": "model_int8.tflite"}  # in TFLITE_DIR
WARMUP_REQUESTS_FILE = "tf_serving_warmup_requests"  # in METADATA_DIR: TF Serving replays it at load
TFLITE_METADATA_FILE = "tflite.json"  # in TFLITE_DIR: input, quantisation, outputs, classes
TFLITE_INPUT = "image"  # the TFLite models' one input: uint8 RGB pixels [1, size, size, 3]
HISTORY_FILE = "history.json"  # the Trainer's per-epoch metrics
METADATA_DB_FILE = "metadata.sqlite"  # ML Metadata of a local run
RUN_SUMMARY_FILE = "run_summary.json"  # the last run's summary, in the output dir
