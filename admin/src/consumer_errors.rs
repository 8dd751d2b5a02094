//! How every adstream consumer treats an error that `poll`/`recv` returns
//! instead of a record.
//!
//! librdkafka hands a consumer more than fetch results: with the consumer
//! queue forwarded (rdkafka does this), a dropped broker connection, a
//! request timeout or a coordinator move also arrives as an error "message".
//! librdkafka recovers from those itself (it reconnects and fetches again
//! from the position it holds), so a consumer that stopped on them stopped
//! on every broker restart, rolling upgrade or network blip. What no retry
//! can fix is a fatal error or a refused authorisation: those end the
//! process with the error.

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

/// Whether a consumer error leaves nothing to do but stop. Everything else
/// is logged by the caller and consumption goes on.
pub fn consumer_error_is_fatal(e: &KafkaError) -> bool {
    match e {
        KafkaError::MessageConsumptionFatal(_) => true,
        KafkaError::MessageConsumption(code) => matches!(
            code,
            RDKafkaErrorCode::Authentication
                | RDKafkaErrorCode::SaslAuthenticationFailed
                | RDKafkaErrorCode::TopicAuthorizationFailed
                | RDKafkaErrorCode::GroupAuthorizationFailed
                | RDKafkaErrorCode::ClusterAuthorizationFailed
        ),
        // Partition EOF only comes when asked for; anything else a consumer
        // returns is not a fetch-level condition librdkafka retries.
        KafkaError::PartitionEOF(_) => false,
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transport_and_timeouts_are_not_fatal_but_refusals_are() {
        for code in [
            RDKafkaErrorCode::BrokerTransportFailure,
            RDKafkaErrorCode::AllBrokersDown,
            RDKafkaErrorCode::OperationTimedOut,
            RDKafkaErrorCode::NotCoordinator,
            RDKafkaErrorCode::UnknownTopicOrPartition,
        ] {
            assert!(
                !consumer_error_is_fatal(&KafkaError::MessageConsumption(code)),
                "{code:?}"
            );
        }
        for code in [
            RDKafkaErrorCode::TopicAuthorizationFailed,
            RDKafkaErrorCode::SaslAuthenticationFailed,
        ] {
            assert!(consumer_error_is_fatal(&KafkaError::MessageConsumption(
                code
            )));
        }
        assert!(consumer_error_is_fatal(
            &KafkaError::MessageConsumptionFatal(RDKafkaErrorCode::BrokerTransportFailure)
        ));
    }
}
