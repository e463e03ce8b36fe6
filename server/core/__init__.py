"""The decisions: Verify, enrolment with de-duplication, review and erasure, the
duplicate thresholds, NIK rules, the inference engine and the metrics they record.
Imports the pipeline, the model sets and the storage layer; nothing of the gRPC edge."""
