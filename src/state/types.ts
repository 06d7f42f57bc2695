export type JsonObject = { [key: string]: unknown };

export interface Condition {
  type: string;
  status: 'True' | 'False' | 'Unknown';
  reason: string;
  message: string;
  lastTransitionTime: string;
  observedGeneration?: number;
}

export interface ResourceStatus {
  phase: string;
  observedGeneration?: number;
  conditions: Condition[];
  [field: string]: unknown;
}

export interface ResourceMeta {
  name: string;
  uid: string;
  generation: number;
  resourceVersion: number;
  labels: Record<string, string>;
  annotations: Record<string, string>;
  creationTimestamp: string;
  deletionTimestamp?: string;
}

export interface StoredResource<Spec = JsonObject> {
  apiVersion: string;
  kind: string;
  metadata: ResourceMeta;
  spec: Spec;
  status?: ResourceStatus;
  source: ResourceSource;
  sourceFile?: string;
}

export type ResourceSource = 'apply' | 'api' | 'kubernetes';

export interface ResourceInput {
  kind: string;
  name: string;
  labels?: Record<string, string>;
  annotations?: Record<string, string>;
  spec: JsonObject;
  source: ResourceSource;
  sourceFile?: string;
}

export type EventType = 'Normal' | 'Warning';

export interface StoredEvent {
  id: number;
  firstTimestamp: string;
  lastTimestamp: string;
  kind: string;
  name: string;
  type: EventType;
  reason: string;
  message: string;
  count: number;
}

export interface EventInput {
  kind: string;
  name: string;
  type: EventType;
  reason: string;
  message: string;
}

export interface Allocation {
  pool: string;
  port: number;
  userId: string;
  resourceName: string | null;
  state: 'bound' | 'cooldown';
  boundAt: string;
  releasedAt: string | null;
}

export interface Change {
  seq: number;
  kind: string;
  name: string;
  op: 'upsert' | 'delete-requested' | 'deleted' | 'status';
}

export const API_VERSION = 'polydev.ai/v1alpha1';

/** Upsert or set a condition, keeping lastTransitionTime when the status does not change (Kubernetes semantics). */
export function setCondition(
  conditions: Condition[],
  next: Omit<Condition, 'lastTransitionTime'>,
  now: string,
): Condition[] {
  const out = conditions.filter((c) => c.type !== next.type);
  const prev = conditions.find((c) => c.type === next.type);
  const lastTransitionTime = prev && prev.status === next.status ? prev.lastTransitionTime : now;
  out.push({ ...next, lastTransitionTime });
  out.sort((a, b) => a.type.localeCompare(b.type));
  return out;
}
