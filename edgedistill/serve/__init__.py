"""An OpenAI-compatible service over any artifact the runtimes load, with the teacher behind it.

    edgedistill serve runs/sentiment/export/student-q4_k_m.gguf                 # http://127.0.0.1:8000/v1
    edgedistill serve runs/sentiment/export/student-q4_k_m.gguf --teacher http://gpu-box:8000/v1
    edgedistill serve smollm2-135m-instruct --port 8080 --threads 2             # CPU, a built-in model
    curl -s http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "student-q4_k_m", "messages": [{"role": "user", "content": "Hello"}]}'

Parts: protocol (the OpenAI wire format and its errors), queue (one generation at a time per loaded
model, a bounded queue in front), teacher (an endpoint or a local model), router (who answers a
request that leaves it to the service), app (the FastAPI app, built from opened runtimes) and
server (the command: checks, loading, uvicorn).
"""
