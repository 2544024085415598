// transformers.js on an exported folder, offline: `node generate.mjs REQUEST.json` prints one JSON line.
// REQUEST: {"model_dir", "dtype", "cases": [{"image", "task", "pixel_values"?, "max_new_tokens", ...options}]}
// -> {"results": [{"ids": [[...]], "text": "..."}]}: the generated ids and their text with special tokens.
// "pixel_values" ({"file": raw float32, "dims": [...]}) replaces the processor's pixels by the caller's.
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { env, AutoProcessor, Florence2ForConditionalGeneration, RawImage, Tensor } from '@huggingface/transformers';

const request = JSON.parse(readFileSync(process.argv[2], 'utf8'));
env.allowRemoteModels = false;
env.allowLocalModels = true;
env.localModelPath = path.dirname(request.model_dir) + path.sep;
const name = path.basename(request.model_dir);

const model = await Florence2ForConditionalGeneration.from_pretrained(name, { dtype: request.dtype ?? 'fp32' });
const processor = await AutoProcessor.from_pretrained(name);
const results = [];
for (const { image, task, pixel_values, ...options } of request.cases) {
    const inputs = await processor(await RawImage.read(image), task);
    if (pixel_values) {
        const bytes = readFileSync(pixel_values.file);
        const data = new Float32Array(bytes.buffer, bytes.byteOffset, bytes.length / 4);
        inputs.pixel_values = new Tensor('float32', data, pixel_values.dims);
    }
    const ids = await model.generate({ ...inputs, ...options });
    const text = processor.batch_decode(ids, { skip_special_tokens: false })[0];
    results.push({ ids: ids.tolist().map((row) => row.map(Number)), text });
}
console.log(JSON.stringify({ results }));
