"""Inference on photos: face detection (`face_detect`) and landmarks of the detected faces in image
pixels (`predictor`). The command is `star_jax.predict`."""
