"""`vall-e demo` (`python -m vall_e.demo`): the offline end-to-end demo, corpus -> train -> speak (`run`)."""
