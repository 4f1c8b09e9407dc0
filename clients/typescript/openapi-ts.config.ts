// @hey-api/openapi-ts: `npx openapi-ts` writes the client to src/client from the running
// service's schema. OPENAPI_URL (a URL or a file) and OPENAPI_OUTPUT override the defaults.
import { defineConfig } from '@hey-api/openapi-ts';

export default defineConfig({
  input: process.env.OPENAPI_URL ?? 'http://localhost:8000/openapi.json',
  output: process.env.OPENAPI_OUTPUT ?? 'src/client',
  plugins: ['@hey-api/client-fetch', '@hey-api/typescript', '@hey-api/sdk'],
});
