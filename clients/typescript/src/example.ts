// The README's example: detect objects in a photo with the generated client (src/client).
// Run: npx tsc && node dist/example.js photo.jpg
import { readFile } from 'node:fs/promises';

import { client } from './client/client.gen';
import { detect } from './client/sdk.gen';

async function main(path: string): Promise<void> {
  // The base URL defaults to the schema's `servers` entry; the key is sent only when set.
  client.setConfig({ auth: process.env.YOLOV1_API_KEY });
  const image = new Blob([await readFile(path)], { type: 'image/jpeg' });
  const { data, error, response } = await detect({
    body: { image },
    query: { confidence: 0.1, classes: ['dog', 'person'] },
  });
  if (error) {
    // 422: a list of {loc, msg, type}; any other error: one message.
    const detail =
      typeof error.detail === 'string' ? error.detail : error.detail.map((i) => i.msg).join('; ');
    throw new Error(`${response.status}: ${detail}`);
  }
  for (const d of data.detections) {
    console.log(d.label, d.confidence.toFixed(2), JSON.stringify(d.box));
  }
}

main(process.argv[2] ?? 'photo.jpg').catch((err: unknown) => {
  console.error(String(err));
  process.exit(1);
});
