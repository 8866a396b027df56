"""Two-process `tf.distribute.MultiWorkerMirroredStrategy` run of keras-ema.

Used by `tests/test_distribute.py`:

    python tests/_mwms_worker.py launch OUTDIR DEADLINE_SECONDS

picks two free ports on 127.0.0.1, starts two workers (this file in
`worker` mode, with TF_CONFIG naming both), waits for them until the
deadline, kills what is left, and writes `OUTDIR/launch.json`. Each worker
trains a few steps with a custom loop (`strategy.run` calling
`apply_gradients`; Keras 3's `fit` fails under this strategy before any
optimizer runs, keras-team/keras#20585), swaps the averages in, writes a
checkpoint (the chief into OUTDIR, the other worker into a scratch folder,
as TensorFlow asks), and saves what it holds to `OUTDIR/worker<i>.npz`.

Importing this module imports nothing heavy: the test uses `build` to load
the chief's files.
"""

import json
import os
import socket
import subprocess
import sys
import time

WORKERS = 2
BATCH = 16  # global batch
SAMPLES = 64
DECAY = 0.9
COLLECTIVE_TIMEOUT_S = 30


def build(keras, keras_ema):
    """The model and optimizer of every worker (and of the test's loads)."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(8, activation="relu"),
        keras.layers.Dense(1),
    ])
    opt = keras_ema.ExponentialMovingAverage(
        keras.optimizers.SGD(0.05), average_decay=DECAY
    )
    opt.build(model.trainable_variables)
    return model, opt


def data():
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(SAMPLES, 4)).astype("float32")
    y = (x @ np.array([[1.0], [-2.0], [0.5], [3.0]], "float32")).astype(
        "float32"
    )
    return x, y


def worker(index, ports, outdir):
    started = time.perf_counter()
    os.environ["TF_CONFIG"] = json.dumps({
        "cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
        "task": {"type": "worker", "index": index},
    })
    os.environ["KERAS_BACKEND"] = "tensorflow"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import numpy as np
    import tensorflow as tf

    import keras
    import keras_ema

    imported = time.perf_counter()
    strategy = tf.distribute.MultiWorkerMirroredStrategy(
        communication_options=tf.distribute.experimental.CommunicationOptions(
            timeout_seconds=COLLECTIVE_TIMEOUT_S
        )
    )
    connected = time.perf_counter()
    with strategy.scope():
        model, opt = build(keras, keras_ema)

    @tf.function
    def step(x, y):
        def replica_step(x, y):
            with tf.GradientTape() as tape:
                error = model(x, training=True) - y
                loss = tf.reduce_sum(tf.square(error)) / BATCH
            grads = tape.gradient(loss, model.trainable_variables)
            opt.apply_gradients(zip(grads, model.trainable_variables))

        strategy.run(replica_step, args=(x, y))

    x, y = data()
    dataset = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
    )
    weights = model.trainable_variables
    recorded = [[w.numpy() for w in weights]]
    for xb, yb in dataset:
        step(xb, yb)
        recorded.append([w.numpy() for w in weights])
    trained = time.perf_counter()

    raw = [w.numpy() for w in weights]
    averages = [opt.average(w).numpy() for w in weights]
    opt.swap_weights()
    chief = index == 0
    folder = outdir if chief else os.path.join(outdir, f"scratch_{index}")
    os.makedirs(folder, exist_ok=True)
    if chief:
        model.save_weights(os.path.join(folder, "ema.weights.h5"))
    # Every worker writes: a checkpoint may need collectives on all of them.
    tf.train.Checkpoint(model=model, optimizer=opt).write(
        os.path.join(folder, "ckpt")
    )
    (step_variable,) = [v for v in opt.variables if v.name == "average_step"]
    arrays = {
        "replicas": strategy.num_replicas_in_sync,
        "step": step_variable.numpy(),
        "iterations": opt.iterations.numpy(),
        "swapped_in": opt.averages_swapped_in,
        "steps_run": len(recorded) - 1,
    }
    for i, w in enumerate(weights):
        arrays[f"raw_{i}"] = raw[i]
        arrays[f"average_{i}"] = averages[i]
        arrays[f"swapped_weight_{i}"] = w.numpy()
        arrays[f"swapped_average_{i}"] = opt.average(w).numpy()
        for s, values in enumerate(recorded):
            arrays[f"recorded_{s}_{i}"] = values[i]
    np.savez(os.path.join(outdir, f"worker{index}.npz"), **arrays)
    done = time.perf_counter()
    print(json.dumps({
        "worker": index,
        "import_s": round(imported - started, 2),
        "connect_s": round(connected - imported, 2),
        "train_s": round(trained - connected, 2),
        "total_s": round(done - started, 2),
    }), flush=True)


def free_ports(n):
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def launch(outdir, deadline_s):
    started = time.monotonic()
    ports = free_ports(WORKERS)
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "worker", str(i),
             ",".join(map(str, ports)), outdir],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(WORKERS)
    ]
    results = []
    for proc in procs:
        left = max(1.0, deadline_s - (time.monotonic() - started))
        try:
            out, _ = proc.communicate(timeout=left)
            timed_out = False
        except subprocess.TimeoutExpired:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            out, _ = proc.communicate()
            timed_out = True
        results.append({
            "rc": proc.returncode, "timed_out": timed_out,
            "output": out[-4000:],
        })
    summary = {
        "ports": ports,
        "seconds": round(time.monotonic() - started, 2),
        "workers": results,
    }
    with open(os.path.join(outdir, "launch.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return 0 if all(r["rc"] == 0 for r in results) else 1


if __name__ == "__main__":
    if sys.argv[1] == "launch":
        sys.exit(launch(sys.argv[2], float(sys.argv[3])))
    worker(int(sys.argv[2]), sys.argv[3].split(","), sys.argv[4])
