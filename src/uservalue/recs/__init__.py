"""Top-K item recommendations from the same behaviour log (issue 18): models behind one interface
(`base.Recommender`), their time-split evaluation, and the planted truth's own ranking."""
