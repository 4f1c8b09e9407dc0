// Drives every route of a live service through the generated client and prints what it got,
// as JSON, for tests/test_generated_clients.py to check against its own requests.
// Run: node dist/smoke.js plan.json (see Plan below).
import { readFile, writeFile } from 'node:fs/promises';

import { createClient } from './client/client';
import { client } from './client/client.gen';
import { detect, detectBatch, modelInfo, render } from './client/sdk.gen';
import type { ErrorResponse, ValidationErrorResponse } from './client/types.gen';

interface Plan {
  baseUrl: string;
  apiKey: string | null;
  images: [string, string]; // two JPEG files
  gif: string;
  render: string; // where to save the rendered JPEG
  query: { confidence: number; iou: number; max_detections: number; classes: string[] };
}

type Failure =
  | { status: number; message: string }
  | { status: number; issues: { loc: (string | number)[]; msg: string; type: string }[] };

function failure(status: number, error: ErrorResponse | ValidationErrorResponse): Failure {
  // The generated types tell the two error bodies apart by their `detail`.
  if (typeof error.detail === 'string') {
    return { status, message: error.detail };
  }
  return { status, issues: error.detail.map(({ loc, msg, type }) => ({ loc, msg, type })) };
}

async function jpeg(path: string): Promise<Blob> {
  return new Blob([await readFile(path)], { type: 'image/jpeg' });
}

async function main(planPath: string): Promise<void> {
  const plan = JSON.parse(await readFile(planPath, 'utf8')) as Plan;
  client.setConfig({ baseUrl: plan.baseUrl, auth: plan.apiKey ?? undefined });
  const query = plan.query;
  const out: Record<string, unknown> = {};

  const one = await detect({ body: { image: await jpeg(plan.images[0]) }, query });
  if (one.error) throw new Error(`detect: ${JSON.stringify(failure(one.response.status, one.error))}`);
  out.detect = one.data;

  const images = [await jpeg(plan.images[0]), await jpeg(plan.images[1])];
  const batch = await detectBatch({ body: { images } });
  if (batch.error) throw new Error(`detectBatch: ${batch.response.status}`);
  out.batch = batch.data;

  const info = await modelInfo();
  if (info.error) throw new Error(`modelInfo: ${info.response.status}`);
  out.model = info.data;

  const drawn = await render({ body: { image: await jpeg(plan.images[0]) }, query });
  if (drawn.error) throw new Error(`render: ${drawn.response.status}`);
  await writeFile(plan.render, Buffer.from(await drawn.data.arrayBuffer()));
  out.render = { contentType: drawn.response.headers.get('content-type') };

  const gif = new Blob([await readFile(plan.gif)], { type: 'image/gif' });
  const refused = await detect({ body: { image: gif } });
  out.unsupported = refused.error ? failure(refused.response.status, refused.error) : null;

  const unknown = await detect({
    body: { image: await jpeg(plan.images[0]) },
    query: { classes: ['unicorn'] },
  });
  out.invalid = unknown.error ? failure(unknown.response.status, unknown.error) : null;

  const anonymous = createClient({ baseUrl: plan.baseUrl });
  const denied = await detect({ client: anonymous, body: { image: await jpeg(plan.images[0]) } });
  out.anonymous = denied.error ? failure(denied.response.status, denied.error) : { status: 200 };

  console.log(JSON.stringify(out));
}

main(process.argv[2]).catch((err: unknown) => {
  console.error(err instanceof Error ? err.message : String(err));
  process.exit(1);
});
