module gguf-surgeon/tests/ollama_template

go 1.19
