// The logic of {{name}}, without host calls, so that it is unit-tested with plain Node.

/** The summary published for `order`; an order without an `id` throws. */
export function summarize(order, subject) {
  if (order.id === undefined) {
    throw new TypeError("the order has no id");
  }
  return { id: order.id, subject, handled_by: "{{name}}" };
}
