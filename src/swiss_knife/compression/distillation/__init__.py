"""Knowledge distillation: losses (`losses`), packed data (`data`), the accelerate loop (`loop`).

`api.distill(teacher, student, config, train_data=...)` is the entry point; the `distill`
command and the recipe stage of the same name call it. Nothing is imported here, so importing
the package stays cheap.
"""
