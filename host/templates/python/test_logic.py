import unittest

from logic import summarize


class SummarizeTest(unittest.TestCase):
    def test_summarizes_an_order(self):
        self.assertEqual(
            summarize({"id": 7, "amount": 1}, "orders.eu"),
            {"id": 7, "subject": "orders.eu", "handled_by": "{{name}}"},
        )

    def test_an_order_without_id_fails(self):
        with self.assertRaises(KeyError):
            summarize({}, "orders.eu")


if __name__ == "__main__":
    unittest.main()
