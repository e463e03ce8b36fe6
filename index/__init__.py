"""The enrolment gallery: SQLite registry (source of truth) and the FAISS index derived from it."""
