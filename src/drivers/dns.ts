import dns from 'node:dns/promises';
import net from 'node:net';

/** Resolves a host to one IPv4 address (an IPv4 literal is returned as it is, without a lookup). */
export async function resolveIPv4(host: string, timeoutMs = 5000): Promise<string> {
  if (net.isIPv4(host)) return host;
  let timer: NodeJS.Timeout | undefined;
  try {
    const result = await Promise.race([
      dns.lookup(host, { family: 4 }),
      new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new Error(`resolving ${host} timed out after ${timeoutMs} ms`)), timeoutMs);
      }),
    ]);
    return result.address;
  } catch (err) {
    throw new Error(`cannot resolve upstream host ${host}: ${(err as Error).message}`);
  } finally {
    if (timer) clearTimeout(timer);
  }
}
