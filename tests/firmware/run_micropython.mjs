// Runs one Python script in the real MicroPython WebAssembly port under node.
// Usage: node run_micropython.mjs <package dir> <plan.json>
// plan.json: {"files": {"<path in MicroPython FS>": "<host path>"}, "script": "<host path>",
//             "heapsize": <bytes>}
// Optional "loop": Python statements run as separate top-level calls until they set the global
// `done` to True (at most "max_loop" times). This port only garbage-collects between top-level
// calls (its split heap defers gc.collect() until the stack is empty), so a loop driven from here
// is what lets heap measurements see live data instead of every byte ever allocated.
// Optional "finish": statements run once after the loop.
// The script's stdout goes to stdout line by line; an uncaught Python exception is printed to
// stderr and the exit code is 3. The port's own CLI exits 0 whatever the script did, hence this.
import fs from "fs";
import path from "path";
import url from "url";

const [pkgDir, planPath] = process.argv.slice(2);
const plan = JSON.parse(fs.readFileSync(planPath, "utf8"));
const mjs = path.join(pkgDir, "micropython.mjs");
const { loadMicroPython } = await import(url.pathToFileURL(mjs).href);
const mp = await loadMicroPython({
  heapsize: plan.heapsize || 1024 * 1024,
  stdout: (line) => process.stdout.write(line + "\n"),
  stderr: (line) => process.stderr.write(line + "\n"),
});

function mkdirs(dir) {
  let cur = "";
  for (const part of dir.split("/").filter(Boolean)) {
    cur += "/" + part;
    try { mp.FS.mkdir(cur); } catch (e) { /* exists */ }
  }
}
for (const [target, host] of Object.entries(plan.files)) {
  mkdirs(path.posix.dirname(target));
  mp.FS.writeFile(target, fs.readFileSync(host));
}
try {
  mp.runPython(fs.readFileSync(plan.script, "utf8"));
  if (plan.loop) {
    let n = 0;
    for (; n < (plan.max_loop || 100000); n++) {
      mp.runPython(plan.loop);
      if (mp.globals.get("done") === true) break;
    }
    if (n === (plan.max_loop || 100000)) throw new Error("loop did not set done within max_loop calls");
  }
  if (plan.finish) mp.runPython(plan.finish);
} catch (error) {
  if (error.name !== "PythonError") throw error;
  process.stderr.write("PYTHON-ERROR " + error.type + "\n" + error.message + "\n");
  process.exitCode = 3;
}
