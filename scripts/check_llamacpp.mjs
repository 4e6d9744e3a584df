// Evaluate a prompt in real llama.cpp (through node-llama-cpp's prebuilt CPU binary), with and without
// a GGUF LoRA adapter; write the raw next-token logits and a greedy continuation as JSON.
//
// Driven by scripts/check_llamacpp.py, which explains the whole check. Usage:
//   NODE_PATH=/work/llamacpp/node_modules node scripts/check_llamacpp.mjs REQUEST.json RESULT.json
// REQUEST.json: {"model": "base.gguf", "lora": "adapter.gguf", "scale": 1, "prompt": [token ids],
//                "positions": [prompt indexes whose next-token logits to return], "n_gen": 20}
// RESULT.json: {"llama_cpp": {...build...}, "runs": {"base": RUN, "lora": RUN}} with
//   RUN = {"logits": {position: [vocab floats, by token id]}, "greedy": [token ids]}.
// Nothing is built or downloaded: getLlama is told to use the prebuilt binary only.
import { readFileSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import path from "node:path";

const [requestPath, resultPath] = process.argv.slice(2);
if (!requestPath || !resultPath) {
    console.error("usage: node scripts/check_llamacpp.mjs REQUEST.json RESULT.json");
    process.exit(2);
}
const request = JSON.parse(readFileSync(requestPath, "utf8"));
// Resolve node-llama-cpp from NODE_PATH (it is installed outside the repository).
const require = createRequire(path.join(process.env.NODE_PATH ?? process.cwd(), "noop.js"));
const { getLlama, LlamaLogLevel } = await import(require.resolve("node-llama-cpp"));

const llama = await getLlama({ gpu: false, build: "never", skipDownload: true, usePrebuiltBinaries: true,
                               logLevel: LlamaLogLevel.error });
const model = await llama.loadModel({ modelPath: request.model });

async function run(lora) {
    const context = await model.createContext({
        contextSize: 256, threads: 1, sequences: 1,
        ...(lora ? { lora: { adapters: [{ filePath: lora, scale: request.scale ?? 1 }] } } : {}),
    });
    const sequence = context.getSequence();
    const wanted = new Set(request.positions);
    const input = request.prompt.map((token, i) => wanted.has(i)
        ? [token, { generateNext: { logits: true, options: { temperature: 0 } } }]
        : token);
    const outputs = await sequence.controlledEvaluate(input);
    const logits = {};
    for (const i of request.positions) {
        const pairs = outputs[i].next.logits; // Map token -> logit (all tokens, sorted by logit)
        const row = new Array(pairs.size);
        for (const [token, value] of pairs) row[token] = value;
        logits[i] = row;
    }
    sequence.clearHistory();
    const greedy = [];
    for await (const token of sequence.evaluate(request.prompt, { temperature: 0, yieldEogToken: true })) {
        greedy.push(token);
        if (greedy.length >= request.n_gen) break;
    }
    await context.dispose();
    return { logits, greedy };
}

const runs = { base: await run(null), lora: await run(request.lora) };
const nodeLlamaCpp = JSON.parse(readFileSync(path.join(process.env.NODE_PATH ?? "node_modules", "node-llama-cpp",
                                                       "package.json"), "utf8")).version;
const build = { nodeLlamaCpp, release: llama.llamaCppRelease, buildType: llama.buildType, gpu: llama.gpu,
                systemInfo: llama.systemInfo };
writeFileSync(resultPath, JSON.stringify({ llama_cpp: build, runs }));
await model.dispose();
await llama.dispose();
