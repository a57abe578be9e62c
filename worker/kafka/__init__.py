"""The thin typed layer over confluent-kafka: records, client configuration, error
classification, the consumer and the producer. No policy lives here: no observer, no
retries, no dead-letter routing; it returns data and raises typed errors."""
